"""The README's commands are the ones the tests run: every line of its Quick start and Tour.

The Quick start's first command ends in ``qadapt demo`` (run here as written, after the
install, which CI has already done); its second is ``.ci/run``'s test command (checked
textually: running the suite inside the suite would recurse). Every ``qadapt`` line of the
Tour's shell block runs as written with ``$D`` set as the README sets it; the ``serve`` line
is started on a free port and the ``curl`` line's JSON body is posted to it with httpx; the
Python block runs as written. The references for what the outputs must say are the demo
tasks' plain-Python answers (``qadapt.demo.tasks.solve``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qadapt.demo import tasks
from qadapt.demo.run import DATA

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.skipif(not (DATA / "MANIFEST.json").is_file(),
                                reason="the demo files are not generated yet (python tools/make_demo.py)")


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start: end if end > 0 else None]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _commands(block: str) -> list[str]:
    """Shell lines without comments (a ``#`` outside quotes starts one)."""
    out = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(line)
    return out


def _qadapt(words: list[str], **kw) -> subprocess.CompletedProcess:
    assert words[0] == "qadapt", words
    env = dict(os.environ, QADAPT_NO_PROGRESS="1")
    return subprocess.run([sys.executable, "-m", "qadapt", *words[1:]], capture_output=True, text=True, env=env,
                          timeout=300, **kw)


def _expand(line: str) -> list[str]:
    return [w.replace("$D", str(DATA)) for w in shlex.split(line, comments=True)]


def test_quick_start_commands():
    first, second = [c for c in _commands(_blocks(_section("Quick start"), "bash")[0])]
    assert first == 'pip install "torch==2.13.0" -e . && qadapt demo'
    ci = (ROOT / ".ci" / "run").read_text()
    install, test = second.split(" && ")
    assert 'pip install -q "torch==2.13.0" -e ".[dev]"' in ci and install.endswith('-e ".[dev]"')
    assert "python -m pytest -q" in ci and test == "python -m pytest -q"
    r = _qadapt(["qadapt", "demo"])
    assert r.returncode == 0, r.stderr
    for skill in tasks.SKILLS:  # the header names every column
        assert skill in r.stdout.splitlines()[2]


def test_tour_shell_lines():
    block = _blocks(_section("Tour"), "bash")[0]
    lines = _commands(block)
    assert lines[0] == "D=$(qadapt demo --where)"
    r = _qadapt(["qadapt", "demo", "--where"])
    assert r.returncode == 0 and Path(r.stdout.strip()) == DATA
    ran = 0
    for line in lines[1:]:
        words = _expand(line)
        if words[0] != "qadapt" or words[1] == "serve":
            continue
        r = _qadapt(words)
        assert r.returncode == 0, (line, r.stdout[-2000:], r.stderr[-2000:])
        if "--json" in words and words[1] != "check":
            json.loads(r.stdout)
        ran += 1
    assert ran >= 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(args: list[str], port: int):
    """``qadapt ARGS`` (a serve command) started and healthy: (process, url)."""
    import httpx

    env = dict(os.environ, QADAPT_NO_PROGRESS="1")
    proc = subprocess.Popen([sys.executable, "-m", "qadapt", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.terminate()
    raise AssertionError("the server did not become healthy")


def test_tour_serve_and_curl():
    import httpx

    lines = _commands(_blocks(_section("Tour"), "bash")[0])
    serve = next(_expand(line.rstrip("& ")) for line in lines if line.startswith("qadapt serve"))
    curl = next(line for line in lines if line.startswith("curl"))
    body = json.loads(shlex.split(curl)[shlex.split(curl).index("-d") + 1])
    port = _free_port()
    proc, url = _serve([*serve[1:], "--port", str(port)], port)
    try:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        text = body["prompt"].removeprefix(tasks.PREFIX).removesuffix(tasks.ARROW)
        assert r.json()["choices"][0]["text"].strip() == tasks.solve(body["model"], text)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tour_python_block(capsys):
    code = _blocks(_section("Tour"), "python")[0]
    exec(compile(code, "README.md (Tour, Python)", "exec"), {})
    out = capsys.readouterr().out
    assert "RED COW AND THE QUEEN" in out and "seven one seven" in out


def test_real_model_commands_parse():
    """The Hub recipe cannot run here (it downloads a 4.4 GB model): each of its `qadapt` lines must at least
    parse against the CLI as written (every option exists and takes its value), and its curl body is JSON."""
    from qadapt.cli import main

    start = README.index("### A real model\n")
    section = README[start: README.index("\n## ", start)]
    lines = [" ".join(c.replace("\\\n", " ").split()) for b in _blocks(section, "bash")
             for c in re.split(r"(?<!\\)\n", b) if c.strip()]
    commands = [shlex.split(line.rstrip("& ")) for line in lines]
    ran = 0
    for words in commands:
        if words[0] == "curl":
            json.loads(words[words.index("-d") + 1])
            continue
        assert words[0] == "qadapt", words
        ctx = main.make_context("qadapt", words[1:2])
        sub = main.get_command(ctx, words[1])
        sub.make_context(words[1], words[2:])
        ran += 1
    assert ran == 3


def test_http_server_section(request):
    """The HTTP server section as written: its serve line (on a free port for 8001), every curl body posted
    to its path, and its Python block run with LoRAX's own client (in the clients' venv)."""
    import httpx

    from client_venv import make_venv

    start = README.index("### HTTP server\n")
    section = README[start: README.index("\n## ", start)]
    lines = _commands(_blocks(section, "bash")[0])
    assert lines[0] == "D=$(qadapt demo --where)"
    serve = _expand(next(line for line in lines if line.startswith("qadapt serve")).rstrip("& "))
    port = _free_port()
    serve[serve.index("--port") + 1] = str(port)
    proc, url = _serve(serve[1:], port)
    try:
        curls = [shlex.split(line) for line in lines if line.startswith("curl")]
        assert len(curls) >= 5
        for words in curls:
            path = words[words.index("-s") + 1].removeprefix("localhost:8001")
            body = json.loads(words[words.index("-d") + 1])
            r = httpx.post(url + path, json=body, timeout=120)
            assert r.status_code == 200, (path, body, r.text)
        upper = httpx.post(url + "/generate", json=json.loads(curls[0][curls[0].index("-d") + 1]), timeout=60).json()
        assert upper["generated_text"].strip() == tasks.solve("upper", "red cow and the queen")
        assert len(httpx.post(url + "/v1/completions", json=json.loads(curls[2][curls[2].index("-d") + 1]),
                              timeout=60).json()["choices"]) == 2
        python = make_venv(Path(request.config.cache.mkdir("client-venv")))
        if isinstance(python, str):
            pytest.skip(python)
        code = _blocks(section, "python")[0].replace("http://127.0.0.1:8001", url)
        r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0].strip() == tasks.solve("upper", "red cow and the queen")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
