"""Adapter mixes against PEFT's ``add_weighted_adapter`` (peft 0.21.2), the reference LoRAX's
``merged_adapters`` names.

* Factors: every strategy (linear, ties, dare_linear, dare_ties, magnitude_prune, cat; both majority-sign
  methods) gives PEFT's A and B bit for bit: the same float32 operations in the same order. DARE's random
  masks match once PEFT's global generator is seeded where it starts merging (PEFT draws for the new
  adapter's initialisation first, so the test re-seeds right after that step).
* Logits: the mix applied by qadapt on the dequantized GGUF base against PEFT's model with the mix
  active, 1e-4 absolute (float32, the same maths in another order; tests/test_lora.py's tolerance).
* The cache: a mix is built once per (adapter versions, weights, strategy); the registry keeps at most
  ``max_mixes`` idle ones.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qadapt
from models import make_adapter, tiny_hf, write_gguf
from qadapt.adapters.mix import MixSpec, mix
from qadapt.errors import InputError

pytest.importorskip("peft")

WEIGHTS = (0.7, -0.4, 1.3)
IDS = torch.tensor([[1, 5, 9, 30, 2, 7, 11, 4]])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    ref = tiny_hf("llama", seed=7)
    folders = {n: make_adapter(ref, d / n, seed=i + 1) for i, n in enumerate("abc")}
    folders["r8"] = make_adapter(ref, d / "r8", seed=9, r=8, lora_alpha=8)
    model = qadapt.load(str(write_gguf(ref, d / "base.gguf")), mode="dequantize",
                        adapters={n: str(p) for n, p in folders.items()}, activate=[])
    return {"ref": ref, "folders": folders, "model": model}


def peft_mix(env, names, strategy, density=0.6, sign="total", seed=5):
    import peft.tuners.lora.model as lora_model
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(env["ref"]), str(env["folders"][names[0]]), adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(str(env["folders"][n]), adapter_name=n)
    inject = lora_model.LoraModel.inject_adapter

    def seeded(self, *a, **k):  # PEFT initialises the new adapter (drawing), then merges: seed in between
        out = inject(self, *a, **k)
        torch.manual_seed(seed)
        return out

    lora_model.LoraModel.inject_adapter = seeded
    try:
        pm.add_weighted_adapter(list(names), list(WEIGHTS[:len(names)]), "mix", combination_type=strategy,
                                density=density, majority_sign_method=sign)
    finally:
        lora_model.LoraModel.inject_adapter = inject
    pm.set_adapter("mix")
    return pm.eval()


@pytest.mark.parametrize("strategy,sign", [("linear", "total"), ("ties", "total"), ("ties", "frequency"),
                                           ("dare_linear", "total"), ("dare_ties", "frequency"),
                                           ("magnitude_prune", "total"), ("cat", "total")])
def test_factors_and_logits_match_peft(env, strategy, sign):
    m = env["model"]
    pm = peft_mix(env, ("a", "b", "c"), strategy, sign=sign)
    ours = mix("mix", [m.adapters[k] for k in "abc"], MixSpec(("a", "b", "c"), WEIGHTS, strategy, 0.6, sign, 5),
               m.targetable_layers())
    compared = 0
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "mix" in mod.lora_A:
            f = ours.factors[name.removeprefix("base_model.model.")]
            assert torch.equal(mod.lora_A["mix"].weight.data, f.A), name
            assert torch.equal(mod.lora_B["mix"].weight.data, f.B), name
            assert mod.scaling["mix"] == f.scale
            compared += 1
    assert compared == len(ours.factors) == 14
    m.add_adapter(ours)
    try:
        m.activate_adapters(["mix"])
        with torch.no_grad():
            want = pm(IDS).logits
        torch.testing.assert_close(m.logits(IDS), want, atol=1e-4, rtol=0)
    finally:
        m.activate_adapters([])
        m.unload_adapter("mix")


def test_cat_is_the_exact_weighted_sum(env):
    """``cat`` (llama.cpp's per-request scales): the mix equals applying each adapter at its weight."""
    m = env["model"]
    ours = mix("sum", [m.adapters["a"], m.adapters["r8"]], MixSpec(("a", "r8"), (0.5, 2.0), "cat"),
               m.targetable_layers())
    for path, f in ours.factors.items():
        want = sum(w * m.adapters[n].factors[path].scale * m.adapters[n].factors[path].B @ m.adapters[n].factors[path].A
                   for n, w in (("a", 0.5), ("r8", 2.0)))
        torch.testing.assert_close(f.scale * f.B @ f.A, want, atol=1e-6, rtol=1e-5)


def test_refusals_name_the_problem(env):
    m = env["model"]
    with pytest.raises(InputError, match="one rank"):
        mix("x", [m.adapters["a"], m.adapters["r8"]], MixSpec(("a", "r8"), (1, 1), "ties", 0.5),
            m.targetable_layers())
    for spec, words in [(MixSpec(("a",), (1, 2)), "one weight per adapter"), (MixSpec(("a", "a"), (1, 2)), "twice"),
                        (MixSpec(("a",), (1,), "svd"), "merge_strategy"), (MixSpec(("a",), (1,), density=2), "density"),
                        (MixSpec(("a", "b"), (1, 1), "dare_ties", 0.0), "density 0"),
                        (MixSpec(("a",), (1,), majority_sign="most"), "majority_sign_method")]:
        with pytest.raises(InputError, match=words):
            spec.check()


def test_registry_builds_each_mix_once_and_bounds_the_cache(env):
    from qadapt.server.registry import AdapterRegistry

    m = env["model"]
    reg = AdapterRegistry(m, max_mixes=2)
    k1 = reg.acquire_mix(("a", "b"), (0.5, 0.5), "linear")
    k2 = reg.acquire_mix(("a", "b"), (0.5, 0.5), "linear")
    assert k1 == k2 and reg.mixes_built == 1 and k1[0] in m.adapters
    reg.release(k1)
    reg.release(k2)
    others = [reg.acquire_mix(("a", "c"), (w, 1.0), "cat") for w in (0.1, 0.2)]
    for k in others:
        reg.release(k)
    assert reg.mixes() == 2 and k1[0] not in m.adapters  # the least recently used idle mix left the model
    held = reg.acquire_mix(("b", "c"), (1.0, 1.0), "cat")
    assert reg.mixes() == 2 and held[0] in m.adapters
    reg.release(held)
    assert reg.in_use() == 0
    for key in [k for k in m.adapters if k.startswith("mix@")]:
        m.unload_adapter(key)
