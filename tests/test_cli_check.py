"""``qadapt check`` from the command line: exit codes 0/1/2, messages, --json, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import foundation_helpers as fh
from qadapt.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture()
def files(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"base_model_id": "x", "order": ["a"], "layers": {"model.layers.0.mlp.up_proj": 0}}))
    bad_layer = tmp_path / "badlayer.json"
    bad_layer.write_text(json.dumps({"order": ["a"], "layers": {"model.layers.0.mlp.upproj": 0}}))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{\n  "order": ["a",]\n}')
    return {"good": good, "bad_layer": bad_layer, "bad_json": bad_json, "missing": tmp_path / "nope.json"}


def invoke(*args):
    return CliRunner().invoke(main, ["check", *map(str, args)])


def test_valid_exit_0(files):
    r = invoke(files["good"], "--arch", "llama", "--quant", "Q8_0")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[-1].endswith("(llama, Q8_0): valid, 0 warning(s)")


def test_problems_exit_1_one_line_each(files):
    r = invoke(files["bad_layer"], "--arch", "llama")
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert lines[0].startswith("error [layers.model.layers.0.mlp.upproj]: ") and "did you mean" in lines[0]
    assert any(line.startswith("warning [ordering]: ") for line in lines)
    assert "1 problem(s)" in lines[-1]


def test_json_output(files):
    r = invoke(files["bad_layer"], "--arch", "llama", "--json")
    data = json.loads(r.output)
    assert r.exit_code == 1 and data["valid"] is False and data["architecture"] == "llama"
    assert data["problems"][0]["code"] == "unknown-layer" and data["ordering"] == str(files["bad_layer"])
    assert {"problems", "warnings", "quant"} <= set(data)


@pytest.mark.parametrize(
    "key, extra, text",
    [("missing", [], "does not exist"), ("bad_json", [], "line 2 column 17"),
     ("good", ["--quant", "Q9"], "unknown quant type"), ("good", ["--adapter", "noequals"], "NAME=VALUE"),
     ("good", ["--arch", "llama", "--model", "m"], "not both")],
)
def test_usage_and_input_errors_exit_2(files, key, extra, text):
    r = invoke(files[key], *extra)
    assert r.exit_code == 2 and text in r.output and "Traceback" not in r.output


def test_unknown_arch_exit_1_with_suggestion(files):
    r = invoke(files["good"], "--arch", "lama")
    assert r.exit_code == 1 and "did you mean `llama`" in r.output


def _qadapt(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "qadapt", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_subprocess_exit_codes_and_no_traceback(files):
    """Through ``python -m qadapt``: the real entry point, logging and exit codes."""
    gemma = fh.orderings_dir() / "xlora-gemma-paper-ordering.json"
    cases = [
        ((files["good"], "--arch", "llama"), 0, "valid"),
        ((files["missing"],), 2, "does not exist"),
        ((files["bad_json"],), 2, "invalid JSON at line 2"),
        ((files["good"], "--arch", "falcon"), 1, "not supported"),
        ((gemma,), 1, "gemma"),
        ((gemma, "--json"), 1, '"unsupported-architecture"'),
    ]
    for args, code, text in cases:
        p = _qadapt("check", *args)
        assert p.returncode == code, (args, p.stdout, p.stderr)
        assert text in p.stdout + p.stderr, args
        assert "Traceback" not in p.stderr, args
    assert json.loads(_qadapt("check", gemma, "--json").stdout)["valid"] is False
