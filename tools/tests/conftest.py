"""The tools are scripts, not installed: their folder goes on sys.path, as `python tools/X.py` puts it."""
import pathlib
import sys

TOOLS = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TOOLS))
