import argparse
import subprocess
import sys
from importlib.metadata import version

from pdserve.cli import build_parser
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
    assert proc.stderr == ""  # no library's warnings in a normal run


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
    assert single.stderr == gang.stderr == ""  # neither Ray's nor the ranks' output reaches the terminal


def test_version():
    proc = subprocess.run([sys.executable, "-m", "pdserve", "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"pdserve {version('pdserve')}\n", "")


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subparsers(sub)


def test_help_gives_every_flag_a_meaning_and_a_default():
    parsers = [p for p in [build_parser(), *_subparsers(build_parser())] if not p.prog.startswith("pdserve bench")]
    assert [p.prog for p in parsers] == ["pdserve", "pdserve generate", "pdserve serve", "pdserve status",
                                         "pdserve config", "pdserve config validate"]
    for parser in parsers:
        for action in parser._actions:
            if action.option_strings and action.dest not in ("help", "version"):
                assert action.help and "(default: " in action.help, f"{parser.prog} {action.option_strings}"
            elif not action.option_strings:
                assert action.help, f"{parser.prog} {action.dest}"
    proc = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and "--max-tokens MAX_TOKENS" in proc.stdout and "(default: 128)" in proc.stdout


def test_verbose_shows_pdserve_progress(embedded_dir):
    proc = subprocess.run([sys.executable, "-m", "pdserve", "generate", "-v", "--max-tokens", "2", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "INFO pdserve.cli: generating up to 2 tokens after a 1-token prompt" in proc.stderr.splitlines()
