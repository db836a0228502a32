"""``describe_model``: architecture and normalised config from --arch, config.json, GGUF metadata or a Hub id."""

from __future__ import annotations

import json

import pytest

import foundation_helpers as fh
from qadapt.errors import InputError, SourceError, UnsupportedError
from qadapt.model_info import describe_model


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_from_arch_only():
    info = describe_model(arch="Qwen2")
    assert info.architecture == "qwen2" and info.config is None and info.num_hidden_layers is None


def test_from_hf_folder_and_config_file(tmp_path):
    """Reference: a transformers ``config.json`` (gpt2 names: n_embd, n_layer)."""
    folder = fh.save_config(fh.tiny_model("gpt2"), tmp_path)
    for source in (folder, folder / "config.json"):
        info = describe_model(model=str(source))
        assert info.architecture == "gpt2" and info.base_format_hint == "full"
        assert info.config["hidden_size"] == 32 and info.num_hidden_layers == 2 and info.config["intermediate_size"] == 128


def test_gptq_hint_and_unsupported(tmp_path):
    raw = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 64, "vocab_size": 100, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert describe_model(model=str(tmp_path)).base_format_hint == "gptq"
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "gemma"}))
    with pytest.raises(UnsupportedError, match="gemma.*supported: gemma2, gemma3, gpt2, llama"):
        describe_model(model=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="config.json.*hidden_size"):
        describe_model(model=str(tmp_path))


def test_from_gguf_metadata(tmp_path):
    """Reference: gguf-py's GGUFWriter; a Mistral GGUF says `llama`, so it gets the llama table."""
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"embedding_length": 64, "block_count": 3, "attention.head_count": 8,
                       "attention.head_count_kv": 2, "feed_forward_length": 128, "vocab_size": 99}.items():
        w.add_uint32(f"llama.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = describe_model(model=str(path))
    assert info.architecture == "llama" and info.base_format_hint == "gguf"
    assert info.config == {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 8,
                           "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 128, "vocab_size": 99}


def test_missing_and_offline_sources(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        describe_model(model=str(tmp_path / "nope.gguf"))
    with pytest.raises(InputError, match="no config.json"):
        describe_model(model=str(tmp_path))
    with pytest.raises(SourceError, match="org/model.*offline"):
        describe_model(model="org/model:model-Q4_K.gguf")
    with pytest.raises(InputError, match="give an architecture"):
        describe_model()
