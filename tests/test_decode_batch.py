"""The decode fast paths against PEFT on transformers: rows on different adapters in one forward
(stacked adapters, ``bmm`` per adapter over its rows' tokens), cached decode steps with rows at
different positions, grouped-query attention without key copies, and greedy generation with an adapter.

Reference: PEFT over the transformers model (tests/models.py: the GGUF's own weights, F32, so
``dequantize`` runs the same float32 maths in another order). Tolerance 1e-4 absolute on logits of
magnitude ~1 (float32 rounding of differently shaped matmuls; observed ~1e-6).
"""

from __future__ import annotations

import copy

import pytest
import torch

import qadapt
from qadapt.adapters.lora import AdapterContext
from qadapt.runtime.batch import RowCache

from models import LORA_TARGETS, make_adapter, peft_logits, tiny_hf, write_quantized

TARGETS = LORA_TARGETS
IDS = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(7))
ATOL = 1e-4  # see the module docstring


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    out = tmp_path_factory.mktemp("decode")
    hf = tiny_hf("llama", seed=3)  # 4 query heads on 2 KV heads: the grouped attention path
    path = out / "llama-F32.gguf"
    ref = write_quantized(hf, path, "F32", seed=4)
    folders = {
        "x": make_adapter(ref, out / "x", 10),
        "y": make_adapter(ref, out / "y", 11, r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        "z": make_adapter(ref, out / "z", 12, r=2, lora_alpha=2),
    }
    m = qadapt.load(path, mode="dequantize", adapters={k: str(v) for k, v in folders.items()}, activate=[])
    return m, ref, folders


ROW_SETS = [
    # unequal ranks (zero-padded), a row without adapters, two rows on one adapter (padded gather)
    ((), ("x",), ("y",), ("x", "z"), ("x",)),
    # each row on its own adapter, in stack order: no gather or scatter at all
    (("x",), ("y",), ("z",)),
    # an adapter that is not on every layer (y), rows on several adapters
    (("y", "z"), ("z", "x", "y"), ("y",)),
]


@pytest.mark.parametrize("rows", ROW_SETS)
def test_rows_on_different_adapters_matchpeft_logits(setup, rows):
    """One forward over a batch whose rows use different adapter sets (prefill shape, no cache)."""
    m, ref, folders = setup
    ids = IDS.expand(len(rows), -1)
    got = m.decoder(ids, ctx=AdapterContext(rows=rows)).logits
    for i, names in enumerate(rows):
        torch.testing.assert_close(got[i], peft_logits(ref, folders, names, IDS)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("rows", ROW_SETS)
def test_cached_decode_rows_at_different_positions(setup, rows):
    """Prefill each row to its own length, then one decode step of all rows at once (the position mask,
    the indexed cache write, grouped attention) against PEFT's full forward's last position."""
    m, ref, folders = setup
    cache = m.new_cache(IDS.shape[1] + 1, batch=len(rows))
    lengths = [IDS.shape[1] - 1 - (i % 3) for i in range(len(rows))]
    for i, n in enumerate(lengths):
        m.decoder(IDS[:, :n], torch.arange(n).unsqueeze(0), RowCache(cache, [i]), ctx=AdapterContext(rows=(rows[i],)))
    tok = torch.tensor([[int(IDS[0, n])] for n in lengths])
    pos = torch.tensor([[n] for n in lengths])
    got = m.decoder(tok, pos, cache, ctx=AdapterContext(rows=rows), last_only=True).logits[:, -1]
    for i, (names, n) in enumerate(zip(rows, lengths)):
        want = peft_logits(ref, folders, names, IDS[:, : n + 1])[0, -1]
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("active", [("x",), ("x", "y", "z")])
def test_greedy_generation_with_adapters_matchespeft_logits(setup, active):
    """Model.generate (one cached decode step per token: no mask, slice cache writes, grouped attention,
    one adapter's own factors or a stack of three) against PEFT's greedy generate."""
    from peft import PeftModel

    m, ref, folders = setup
    pm = PeftModel.from_pretrained(copy.deepcopy(ref), str(folders[active[0]]), adapter_name=active[0])
    for n in active[1:]:
        pm.load_adapter(str(folders[n]), adapter_name=n)
    pm.base_model.set_adapter(list(active))
    pm.eval()
    prompt = IDS[0].tolist()
    with torch.no_grad():
        want = pm.generate(input_ids=IDS, max_new_tokens=12, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, IDS.shape[1]:].tolist()
    m.activate_adapters(list(active))
    try:
        got = m.generate(prompt, max_new_tokens=12).token_ids
    finally:
        m.activate_adapters([])
    eos = set(m.config.eos_token_ids)
    cut = next((i for i, t in enumerate(want) if t in eos), len(want))
    assert got == want[:cut]


def test_nan_adapter_stays_in_its_rows(tmp_path, setup):
    """An adapter with NaN weights (loaded with a warning) poisons only the rows that use it, even
    though rows on different adapters share one forward."""
    from safetensors.torch import load_file, save_file

    m, ref, folders = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((folders["z"] / "adapter_config.json").read_text())
    sd = load_file(folders["z"] / "adapter_model.safetensors")
    key = next(k for k in sd if "lora_A" in k and "q_proj" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, bad / "adapter_model.safetensors")
    m.load_adapter("bad", bad)
    try:
        rows = (("x",), ("bad",), ("y",))
        got = m.decoder(IDS.expand(3, -1), ctx=AdapterContext(rows=rows)).logits
        assert got[1].isnan().any()
        torch.testing.assert_close(got[0], peft_logits(ref, folders, ("x",), IDS)[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(got[2], peft_logits(ref, folders, ("y",), IDS)[0], atol=ATOL, rtol=0)
    finally:
        m.unload_adapter("bad")


def test_adapter_sets_restack_after_unload(setup):
    """Stacks are cached per adapter set; unloading and reloading an adapter rebuilds them."""
    m, ref, folders = setup
    m.activate_adapters(["x", "z"])
    try:
        first = m.logits(IDS)
        m.activate_adapters(["x"])
        m.unload_adapter("z")
        m.load_adapter("z", folders["y"])  # another adapter under the same name
        m.activate_adapters(["x", "z"])
        torch.testing.assert_close(m.logits(IDS), peft_logits(ref, {"x": folders["x"], "z": folders["y"]}, ("x", "z"), IDS),
                                   atol=ATOL, rtol=0)
        assert not torch.equal(first, m.logits(IDS))
    finally:
        m.activate_adapters([])
        m.unload_adapter("z")
        m.load_adapter("z", folders["z"])
