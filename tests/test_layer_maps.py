"""Layer-map tables: every shipped table loads; broken tables fail naming file and key."""

from __future__ import annotations

import copy
import json

import pytest

from qadapt.errors import FormatError, UnsupportedError
from qadapt.layer_maps import _tables_dir, all_layer_maps, get_layer_map, load_layer_map_file, parse_layer_map


def _shipped(name: str = "llama") -> dict:
    return json.loads((_tables_dir() / f"{name}.json").read_text())


@pytest.mark.parametrize("path", sorted(_tables_dir().glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_table_loads(path):
    lm = load_layer_map_file(path)
    assert lm.architecture == path.stem and lm.layers
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 8, "intermediate_size": 64, "vocab_size": 128, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 16}
    for spec in lm.layers:
        assert all(v > 0 for v in spec.shape(config)), spec.name


def test_all_layer_maps_and_aliases():
    assert {"llama", "mistral", "phi3", "qwen2", "qwen", "gpt2"} <= set(all_layer_maps())
    assert get_layer_map("LLAMA").architecture == "llama"
    with pytest.raises(UnsupportedError, match="gemma.*supported: .*llama"):
        get_layer_map("gemma")


def _broken(mutate):
    data = copy.deepcopy(_shipped())
    mutate(data)
    return data


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda d: d["modules"][0].update(in_featurs=d["modules"][0].pop("in_features")), "modules[0].in_featur"),
        (lambda d: d["modules"][1].update(out_features="hidden_size ** 2"), "modules[1].out_features"),
        (lambda d: d["modules"][2].update(out_features="__import__('os')"), "modules[2].out_features"),
        (lambda d: d["modules"][0].update(formats=["full", "awq"]), "modules[0].formats"),
        (lambda d: d["config"].update(hidden_size=[]), "config.hidden_size"),
        (lambda d: d.update(architectur="llama"), "architectur"),
        (lambda d: d["modules"][3].update(path="model.layers.{block}.x"), "modules[3].path"),
        (lambda d: d.pop("gguf_config"), "gguf_config"),
    ],
)
def test_broken_table_names_file_and_key(tmp_path, mutate, key):
    path = tmp_path / "llama.json"
    path.write_text(json.dumps(_broken(mutate)))
    with pytest.raises(FormatError) as e:
        load_layer_map_file(path)
    assert str(path) in str(e.value) and key in str(e.value)


def test_broken_table_in_memory_names_source():
    with pytest.raises(FormatError, match=r"<test>: schema_version"):
        parse_layer_map(_broken(lambda d: d.update(schema_version=2)), "<test>")


def test_table_json_syntax_error_has_position(tmp_path):
    path = tmp_path / "llama.json"
    path.write_text('{"schema_version": 1,\n  "architecture": }')
    with pytest.raises(FormatError, match=r"line 2 column"):
        load_layer_map_file(path)


def test_table_name_must_match_architecture(tmp_path):
    path = tmp_path / "mistral.json"
    path.write_text(json.dumps(_shipped("llama")))
    with pytest.raises(FormatError, match="architecture"):
        load_layer_map_file(path)


@pytest.mark.parametrize("name", sorted(all_layer_maps()))
def test_gguf_names_match_gguf_py_tensor_map(name):
    """Reference: gguf-py's own HF -> GGUF tensor-name map (what llama.cpp's converter uses). Every targetable
    linear, norm and embedding of each table, for every GGUF architecture it reads, gets the GGUF name gguf-py
    gives for its transformers module path."""
    import gguf

    from qadapt.models.family import FAMILIES

    lm = get_layer_map(name)
    spec = FAMILIES[lm.architecture]
    n = 3
    checked = 0
    for arch in lm.gguf_architectures:
        tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper().replace("-", "_")], n)
        pairs = []
        for ls in lm.layers:
            if ls.tied_to and tmap.get_name(ls.module_path()) is None:
                continue  # always tied in llama.cpp (Gemma 2): the head is the token table, no GGUF name of its own
            for i in range(n) if ls.per_block else [None]:
                # a per-expert module: gguf-py maps the merged tensor's name (the path without the expert index)
                hf = ls.path.replace(".{expert_idx}", "").format(layer_idx=i) if ls.per_expert else ls.module_path(i)
                pairs.append((hf, ls.gguf_name(i)))
        for hf, gg in spec.tensors.values():
            for i in range(n) if "{i}" in hf else [None]:
                pairs.append((hf.format(i=i) if i is not None else hf, gg.format(i=i) if i is not None else gg))
        for hf, gg in pairs:
            suffix = "." + hf.rsplit(".", 1)[1] if hf.endswith((".weight", ".bias")) else ""
            got = tmap.get_name(hf.removesuffix(suffix))
            assert got == gg.removesuffix(suffix), (arch, hf, gg, got)
            checked += 1
    assert checked > 10 or not lm.gguf_architectures
