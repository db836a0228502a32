"""Hostile files: overlapping or out-of-file tensors, lying safetensors headers, escaping links, NaN adapters.

Each must end in a QadaptError naming the file (or, for NaN weights, a warning; a refusal with strict).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct

import numpy as np
import pytest
import torch

import qadapt
from qadapt.errors import AdapterError, FormatError
from qadapt.io import read_safetensors_header

from fuzz_targets import seed_gguf


def _patch_offset(path, index: int, value: int) -> None:
    import gguf

    r = gguf.GGUFReader(path, "r+")
    r.tensors[index].field.parts[-1][0] = value  # the tensor-info data offset
    r.data.flush()


def test_gguf_overlapping_tensors(tmp_path):
    p = seed_gguf(tmp_path / "m.gguf")
    import gguf

    first = gguf.GGUFReader(p).tensors[0]
    _patch_offset(p, 1, int(first.data_offset) - gguf.GGUFReader(p).data_offset)
    with pytest.raises(FormatError, match=r"m\.gguf.*overlap"):
        qadapt.load(p)


def test_gguf_tensor_past_the_end(tmp_path):
    p = seed_gguf(tmp_path / "m.gguf")
    _patch_offset(p, 2, 10**9)
    with pytest.raises(FormatError, match=r"m\.gguf"):
        qadapt.load(p)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]},    # size does not match shape
    {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]},       # unknown dtype
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 4096]},     # past the end
    {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},      # negative dim
])
def test_safetensors_lying_headers(tmp_path, entry):
    header = json.dumps({"w": entry}).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(FormatError, match=r"x\.safetensors.*`w`"):
        read_safetensors_header(p)


def test_safetensors_overlapping_tensors(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 24)
    with pytest.raises(FormatError, match="overlap"):
        read_safetensors_header(p)


@pytest.fixture()
def base_and_adapter(tmp_path):
    import copy

    import peft

    from models import tiny_hf, write_gguf

    hf = tiny_hf("llama", seed=2)
    path = write_gguf(hf, tmp_path / "base.gguf", "F32")
    torch.manual_seed(0)
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                init_lora_weights=False))
    pm.save_pretrained(tmp_path / "ad")
    return path, tmp_path / "ad"


def test_adapter_file_linking_outside_is_refused(base_and_adapter, tmp_path):
    path, ad = base_and_adapter
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(ad / "adapter_config.json", evil / "adapter_config.json")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(ad / "adapter_model.safetensors", outside)
    (evil / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(AdapterError, match="outside the adapter folder"):
        qadapt.load(path, adapters={"e": str(evil)})


def test_nan_adapter_warns_or_is_refused_with_strict(base_and_adapter, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    path, ad = base_and_adapter
    bad = tmp_path / "nan"
    shutil.copytree(ad, bad)
    sd = load_file(str(bad / "adapter_model.safetensors"))
    k = next(k for k in sd if "lora_B" in k)
    sd[k][0, 0] = float("nan")
    save_file(sd, str(bad / "adapter_model.safetensors"))
    with caplog.at_level(logging.WARNING):
        m = qadapt.load(path, adapters={"n": str(bad)})
    assert "NaN" in caplog.text
    m.activate_adapters([])
    assert torch.isfinite(m.logits(torch.tensor([[1, 2, 3]]))).all()  # inactive: no effect at all
    m.unload_adapter("n")
    with pytest.raises(AdapterError, match="NaN"):
        m.load_adapter("n", str(bad), strict=True)
    assert np.isfinite(m.logits(torch.tensor([[1, 2]])).numpy()).all()
