"""The peers' own Python clients in a separate venv: ``lorax-client`` 0.6.3 and ``text-generation`` 0.7.0
pin ``huggingface-hub<1.0``, which breaks the transformers the tests use, so they are installed apart
(once, into pytest's cache) and each test runs a script there that prints JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

PINS = ("lorax-client==0.6.3", "text-generation==0.7.0", "openai>=1.40")


def make_venv(cache: Path) -> Path | str:
    """The venv's python, or why it could not be made (the caller skips with that reason)."""
    venv = cache / "clients"
    python = venv / "bin" / "python"
    stamp = venv / "pins.json"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == list(PINS):
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS],
                       check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        out = getattr(e, "stderr", b"") or b""
        return f"could not make the clients' venv ({type(e).__name__}): {out.decode(errors='replace')[-400:]}"
    stamp.write_text(json.dumps(list(PINS)))
    return python


PRELUDE = '''
import json, sys
URL = sys.argv[1]
OUT = {}
def record(name, fn):
    try:
        r = fn()
        OUT[name] = {"ok": _plain(r)}
    except Exception as e:
        OUT[name] = {"error": type(e).__name__, "message": str(e)}
def _plain(r):
    if hasattr(r, "model_dump"):
        return r.model_dump(mode="json")
    if isinstance(r, (list, tuple)):
        return [_plain(x) for x in r]
    return r
'''


def run_client(python: Path, url: str, code: str, timeout: float = 300) -> dict:
    """Run ``code`` (which fills ``OUT`` through ``record(name, fn)``) with the clients' python."""
    script = PRELUDE + textwrap.dedent(code) + "\nprint(json.dumps(OUT))\n"
    r = subprocess.run([str(python), "-c", script, url], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"client script failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])
