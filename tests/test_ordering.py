"""Ordering files: the mistral.rs files load, writes are atomic and safe, ``create`` equals PEFT's enumeration."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import foundation_helpers as fh
from qadapt.cli import main
from qadapt.errors import FormatError, InputError
from qadapt.layer_maps import get_layer_map
from qadapt.model_info import describe_model
from qadapt.ordering import (
    Ordering, Preload, add_preloads, create_ordering, enumerate_layers, parse_ordering, read_ordering, set_names,
    write_ordering,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_every_conformance_ordering_loads(caplog):
    """Reference: the ordering files published by mistral.rs (shared/conformance/orderings)."""
    files = sorted(fh.orderings_dir().glob("*.json"))
    assert len(files) >= 6
    for path in files:
        with caplog.at_level(logging.WARNING):
            o = read_ordering(path)
        assert o.order, path
        old = path.name.startswith("default-ordering")
        assert (o.base_model_id is None) == old, path
        assert any("older mistral.rs" in w for w in o.warnings) == old, path
        if o.layers:
            assert sorted(o.layers.values()) == list(range(len(o.layers)))
    assert "older mistral.rs" in caplog.text
    paper = read_ordering(fh.orderings_dir() / "lora-paper-ordering.json")
    assert paper.preload_adapters == (Preload("adapter_2", "lamm-mit/x-lora"),) and paper.layers is None


def test_paper_ordering_equals_our_enumeration():
    """Reference: mistral.rs's xlora-paper-ordering.json (made by PEFT on zephyr-7b-beta, 32 blocks)."""
    o = read_ordering(fh.orderings_dir() / "xlora-paper-ordering.json")
    ours = enumerate_layers(get_layer_map("mistral"), 32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])
    assert list(ours.items()) == sorted(o.layers.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize(
    "text, key",
    [('{"order": ["a",', "line 1 column"), ('[1, 2]', "top level"), ('{"order": "a"}', "`order`"),
     ('{"layers": {"x": "1"}}', "`layers.x`"), ('{"layers": {"x": -1}}', "`layers.x`"),
     ('{"base_model_id": 3}', "`base_model_id`"), ('{"preload_adapters": [{"name": 1}]}', "preload_adapters[0].name"),
     ('{"preload_adapters": {}}', "`preload_adapters`")],
)
def test_malformed_files_name_file_and_key(tmp_path, text, key):
    path = tmp_path / "o.json"
    path.write_text(text)
    with pytest.raises(FormatError) as e:
        read_ordering(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_unknown_keys_warn_and_missing_file():
    o = parse_ordering({"base_model_id": "m", "order": ["a"], "layer": {}}, "x.json")
    assert any("unknown key `layer`" in w and "did you mean `layers`" in w for w in o.warnings)
    with pytest.raises(InputError, match="does not exist"):
        read_ordering("/nonexistent/ordering.json")


def test_write_is_atomic_and_refuses_overwrite(tmp_path):
    o = Ordering("m/x", ("a", "b"), {"model.layers.0.self_attn.q_proj": 0}, (Preload("p", "m/p"),))
    path = write_ordering(tmp_path / "o.json", o)
    assert read_ordering(path) == o
    with pytest.raises(InputError, match="--force"):
        write_ordering(path, Ordering("other"))
    assert read_ordering(path) == o
    write_ordering(path, Ordering("other"), force=True)
    assert read_ordering(path).base_model_id == "other"
    assert [p.name for p in tmp_path.iterdir()] == ["o.json"]  # no temp files left


@pytest.mark.parametrize("arch", ["llama", "mistral", "phi3", "qwen2", "gpt2"])
@pytest.mark.parametrize("which", ["some", "all"])
def test_create_layers_equal_peft_enumeration(tmp_path, arch, which):
    """Reference: PEFT's enumeration of LoRA-wrapped modules (``named_modules()`` of ``get_peft_model``)."""
    model = fh.tiny_model(arch)
    targets = fh.ALL_TARGETS[arch] if which == "all" else fh.ALL_TARGETS[arch][1:3]
    folder = fh.save_config(model, tmp_path / "m")
    result = CliRunner().invoke(main, ["ordering", "create", "--model", str(folder), "--targets", ",".join(targets),
                                       "--names", "a,b", "-o", str(tmp_path / "o.json")])
    assert result.exit_code == 0, result.output
    ours = read_ordering(tmp_path / "o.json")
    peft = list(fh.peft_wrapped(model, target_modules=targets))
    assert list(ours.layers) == peft and list(ours.layers.values()) == list(range(len(peft)))
    assert ours.base_model_id == str(folder) and ours.order == ("a", "b")


def test_create_with_arch_and_unknown_target(tmp_path):
    info = describe_model(arch="phi3")
    o = create_ordering(info.layer_map, 2, ["qkv_proj"], ["x"], None)
    assert o.layers == {"model.layers.0.self_attn.qkv_proj": 0, "model.layers.1.self_attn.qkv_proj": 1}
    with pytest.raises(InputError, match=r"q_proj.*phi3.*did you mean `qkv_proj`"):
        enumerate_layers(info.layer_map, 2, ["q_proj"])
    r = CliRunner().invoke(main, ["ordering", "create", "--arch", "phi3", "--targets", "o_proj", "--names", "a",
                                  "-o", str(tmp_path / "o.json")])
    assert r.exit_code == 2 and "--num-layers" in r.output


def test_set_names_and_add_preload(caplog):
    o = Ordering("m", ("a",), {"x": 0})
    with caplog.at_level(logging.WARNING):
        renamed = set_names(o, ["b", "c"])
    assert renamed.order == ("b", "c") and renamed.layers == o.layers and "training" in caplog.text
    both = add_preloads(renamed, [Preload("p", "m/p"), Preload("q", "m/q")])
    again = add_preloads(both, [Preload("p", "m/p2")])
    assert [(p.name, p.adapter_model_id) for p in again.preload_adapters] == [("p", "m/p2"), ("q", "m/q")]


def test_round_trip_create_set_names_add_preload_check(tmp_path):
    """create -> set-names -> add-preload -> check exits 0 (mistral.rs's script workflow)."""
    folder = fh.save_config(fh.tiny_model("llama"), tmp_path / "m")
    run = CliRunner().invoke
    steps = [
        ["ordering", "create", "--model", str(folder), "--targets", "q_proj,v_proj", "--names", "a,b", "-o", "1.json"],
        ["ordering", "set-names", "1.json", "--names", "x,y", "-o", "2.json"],
        ["ordering", "add-preload", "2.json", "--preload", "p=org/p", "--preload", "q=org/q", "-o", "3.json"],
        ["check", "3.json"],
    ]
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        for args in steps:
            r = run(main, args)
            assert r.exit_code == 0, (args, r.output)
        assert "valid" in r.output
        r = run(main, steps[1])
        assert r.exit_code == 2 and "2.json exists" in r.output
        final = read_ordering("3.json")
    assert final.order == ("x", "y") and len(final.layers) == 6 and len(final.preload_adapters) == 2


def _script(name, args, stdin=""):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], input=stdin, text=True,
                          capture_output=True, env=env, timeout=120)


def test_tools_scripts_prompt_and_flags(tmp_path):
    """The tools/ scripts behave like mistral.rs's: prompts without flags, same flags as the commands."""
    folder = fh.save_config(fh.tiny_model("gpt2"), tmp_path / "m")
    out1, out2, out3 = (tmp_path / f"{i}.json" for i in (1, 2, 3))
    r = _script("create_ordering.py", [], f"{folder}\nc_attn, mlp.c_proj\nA,B\n{out1}\n")
    assert r.returncode == 0, r.stderr
    assert list(read_ordering(out1).layers)[:2] == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]
    r = _script("set_names.py", [str(out1), "--names", "C", "-o", str(out2)])
    assert r.returncode == 0 and "training" in r.stderr and read_ordering(out2).order == ("C",)
    r = _script("load_add_preload_adapters.py", [], f"{out2}\nP=org/p\n{out3}\n")
    assert r.returncode == 0, r.stderr
    assert read_ordering(out3).preload_adapters == (Preload("P", "org/p"),)
    r = _script("set_names.py", [str(out1), "--names", "D", "-o", str(out2)])
    assert r.returncode == 2 and "exists" in r.stderr and "Traceback" not in r.stderr
