import subprocess
import sys

from pdserve.engine import model_source


def test_generate_chat_names_paris(embedded_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "generate", "--chat", "--max-tokens", "24",
         "What is the capital of France?"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert proc.stdout.count("\n") == 1  # only the completion on stdout; logs go to stderr


def test_bad_sampling_argument_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve", "generate", "--temperature", "-1", "hi"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "error: temperature must be >= 0, got -1.0" in proc.stderr


def test_embedded_cache_is_converted_once(embedded_dir, monkeypatch):
    def fail(target):
        raise AssertionError("converted again")

    monkeypatch.setattr(model_source, "_convert_embedded", fail)
    assert str(model_source.embedded_model_dir()) == embedded_dir


def test_generate_tp2_prints_the_same_completion(embedded_dir):
    """`--tp 2` runs a gang of two Ray actors on a local cluster; the output contract is unchanged."""
    args = [sys.executable, "-m", "pdserve", "generate", "--dtype", "float32", "--max-tokens", "12", "--chat",
            "What is the capital of France?"]
    single = subprocess.run(args, capture_output=True, text=True, timeout=300)
    gang = subprocess.run([*args, "--tp", "2"], capture_output=True, text=True, timeout=300)
    assert single.returncode == gang.returncode == 0, gang.stderr
    assert gang.stdout == single.stdout and "Paris" in gang.stdout
