"""What a loaded model keeps resident: the weights once, each adapter once, no stray file pages.

The benchmark measures the resident set against the file plus the adapters (``rss_over_files``);
these tests pin down the structure that number rests on, so a change that adds a copy fails here
rather than in a benchmark run: a LoRA factor is never held twice (B^T is a view of B, no stacked
copies after multi-adapter or mixed-row forwards), and pages of the GGUF mapping that no layer
reads (a repacked, permuted or dequantized weight, the token table) are handed back at load.
"""

from __future__ import annotations

import gc
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import qadapt
from qadapt.adapters.lora import LoraLinear
from qadapt.quant import native

from models import make_adapter, tiny_hf, write_quantized


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory")
    hf = tiny_hf("llama", seed=7, hidden_size=256, intermediate_size=512)
    path = out / "llama-Q4_0.gguf"
    ref = write_quantized(hf, path, "Q4_0", seed=8)
    ads = {n: make_adapter(ref, out / n, 20 + k) for k, n in enumerate("abc")}
    return path, ads


def _tensor_storages(mod: torch.nn.Module) -> dict[int, int]:
    """data_ptr -> bytes of every tensor a LoraLinear holds in its own attributes (not its base layer)."""
    seen: dict[int, int] = {}

    def visit(v):
        if isinstance(v, torch.Tensor) and v.dtype != torch.int64:  # not the native calls' plans
            st = v.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif hasattr(v, "__dataclass_fields__"):
            for k in v.__dataclass_fields__:
                visit(getattr(v, k))

    for k, v in vars(mod).items():
        if k not in ("_modules", "_parameters", "_buffers"):
            visit(v)
    return seen


@pytest.mark.parametrize("kernels", ["exact", "q8"])
def test_adapter_factors_are_held_once(base, kernels):
    path, ads = base
    m = qadapt.load(path, kernels=kernels, adapters={n: str(p) for n, p in ads.items()})
    ids = torch.tensor([[1, 5, 9, 7, 3]])
    m.activate_adapters(["a", "b", "c"])
    m.logits(ids)
    # a mixed batch: prefill then one decode step, each row on its own adapters
    from qadapt.adapters.lora import AdapterContext

    ctx = AdapterContext(rows=(("a",), ("b", "c"), ()))
    cache = m.new_cache(8, batch=3)
    with torch.inference_mode():
        m.decoder(ids.expand(3, 5), torch.arange(5).expand(3, 5), cache, ctx=ctx, last_only=True)
        m.decoder(torch.tensor([[2], [3], [4]]), torch.full((3, 1), 5), cache, ctx=ctx, last_only=True)
    wrappers = [w for w in m.decoder.modules() if isinstance(w, LoraLinear) and w.adapters]
    assert wrappers
    # the reference: the float32 tensors PEFT wrote, whose bytes the held factors add up to exactly
    from safetensors import safe_open

    file_bytes = 0
    for folder in ads.values():
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            file_bytes += sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] * 4 for k in f.keys())
    held_bytes = sum(n for w in wrappers for n in _tensor_storages(w).values())
    assert held_bytes == file_bytes, (held_bytes, file_bytes)
    for w in wrappers:
        want = {}
        for name, f in w.adapters.items():
            assert w._bt[name].data_ptr() == f.B.data_ptr(), f"{w.path}: B^T of `{name}` is a copy"
            for t in (f.A, f.B):
                want[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        assert _tensor_storages(w) == want, f"{w.path} holds tensors beyond its adapters' factors"
        # each factor's storage is its own (the adapter file's buffer is not kept alive by a view)
        for f in w.adapters.values():
            assert f.A.untyped_storage().nbytes() == f.A.numel() * 4
            assert f.B.untyped_storage().nbytes() == f.B.numel() * 4


def _resident(path: Path) -> np.ndarray:
    """Per page of this process's one mapping of ``path``: resident or not (/proc/self/pagemap)."""
    with open("/proc/self/maps") as maps:
        spans = [line.split()[0] for line in maps if line.rstrip().endswith(str(path))]
    assert len(spans) == 1, f"{path} is mapped {len(spans)} times"
    lo, hi = (int(x, 16) for x in spans[0].split("-"))
    with open("/proc/self/pagemap", "rb") as pm:
        pm.seek(lo // 4096 * 8)
        ent = np.frombuffer(pm.read((hi - lo) // 4096 * 8), np.uint64)
    return ((ent >> np.uint64(63)) & np.uint64(1)).astype(bool)


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/pagemap is Linux's")
def test_q8_load_releases_the_file_pages(base, tmp_path):
    """In the q8 runtime the blocks' weights are repacked (q/k rows also un-permuted from llama.cpp's
    order) and the token table is looked up by rows: after load, no page inside those tensors is
    resident. (The tiny vocabulary's output head is not a multiple of 8 rows: it runs on the file's
    bytes, which stay mapped; pages shared with a neighbour at a tensor's ends are not checked.)"""
    if native.library() is None:
        pytest.skip("no native kernels (C compiler / AVX2)")
    path = tmp_path / "own.gguf"  # mapped by this test's model only
    shutil.copy(base[0], path)
    import gguf

    reader = gguf.GGUFReader(path)
    spans = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    del reader
    gc.collect()
    m = qadapt.load(path, kernels="q8")
    from qadapt.quant import repack

    repack.wait(m.decoder)  # the 8-row repack runs after load, on a background thread
    pages = _resident(path.resolve())
    checked = 0
    for name, (off, n) in spans.items():
        if name == "token_embd.weight" or (name.startswith("blk.") and name.endswith("_proj.weight")) \
                or name.startswith("blk.") and ".attn_" in name or ".ffn_" in name and "norm" not in name:
            inner = pages[-(-off // 4096) + 1:(off + n) // 4096 - 1]
            assert not inner.any(), f"{name}: {int(inner.sum())} of its pages still resident"
            checked += len(inner)
    assert checked > 100 and m.decoder.blocks[0].linears["q"].path == "q8"


@pytest.mark.skipif(platform.system() != "Linux", reason="/proc/self/pagemap is Linux's")
@pytest.mark.parametrize("kernels", ["exact", "q8"])
def test_token_lookups_read_rows_not_pages(base, tmp_path, kernels):
    """Looking tokens up reads their rows from the file: a read through the mapping would keep the
    kernel's 64 KiB fault-around of every row resident (tens of MB over a few hundred scattered
    tokens on a real vocabulary). The rows must still be gguf-py's dequantization of the table,
    bit for bit (both follow gguf-py's float order), also once the file is gone."""
    path = tmp_path / "own.gguf"
    shutil.copy(base[0], path)
    import gguf

    reader = gguf.GGUFReader(path)
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    off, n = int(t.data_offset), int(t.n_bytes)
    table = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    del reader, t
    gc.collect()
    m = qadapt.load(path, kernels=kernels)
    embed = m.decoder.embed
    ids = torch.arange(3, table.shape[0], 7).view(1, -1)
    with torch.inference_mode():
        got = embed(ids)
        m.decoder(ids[:, :16], torch.arange(16).view(1, -1))
    assert torch.equal(got[0], table[ids[0]])
    inner = _resident(path.resolve())[-(-off // 4096) + 1:(off + n) // 4096 - 1]
    assert len(inner) > 4 and not inner.any(), f"{int(inner.sum())} of the table's {len(inner)} pages resident"
    path.unlink()
    with torch.inference_mode():
        assert torch.equal(embed(ids[:, ::3])[0], table[ids[0, ::3]])
