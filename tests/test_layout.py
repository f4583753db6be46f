"""The checkout's top-level folders never shadow an installed distribution of the same import name."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# kv_transfer/__init__.py declares the package's public API (pdserve.kv_transfer.KVSender, ...); no
# distribution takes that name (docs/decisions.md).
REGULAR = {"pdserve", "kv_transfer"}


def fake_distribution(site: pathlib.Path, name: str) -> None:
    """An installed regular package `name` that says where it came from, with its dist-info."""
    (site / name).mkdir()
    (site / name / "__init__.py").write_text('ORIGIN = "installed"\n')
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")


def test_installed_kernels_and_router_win_over_the_top_level_folders(tmp_path):
    for name in ("kernels", "router"):
        fake_distribution(tmp_path, name)
    code = ("import kernels, router; print(kernels.ORIGIN, router.ORIGIN); "
            "import pdserve.kernels.ops, pdserve.router.frontend, pdserve.kv_transfer; "
            "print(pdserve.kernels.ops.__file__); print(pdserve.kv_transfer.KVSender.__name__)")
    # `python -c` run from the root puts the root first on sys.path, ahead of the fake site folder.
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["installed installed", str(ROOT / "kernels" / "ops.py"), "KVSender"]


def test_no_top_level_code_folder_is_a_regular_package_but_the_declared_ones():
    code_folders = {p.parent.name for p in ROOT.glob("*/*.py")}
    regular = {name for name in code_folders if (ROOT / name / "__init__.py").exists()}
    assert regular == REGULAR
    assert {"kernels", "router", "cluster", "engine", "bench"} <= code_folders
