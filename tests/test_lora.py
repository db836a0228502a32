"""LoRA on quantized GGUF bases against PEFT on transformers with the gguf-py-dequantized weights.

Reference: ``peft.get_peft_model`` over the transformers model whose weights are gguf-py's
dequantization of the file's tensors (tests/models.py). Each reference PeftModel holds only
the adapters of the combination under test (FIELD-NOTES: an lm_head adapter leaks otherwise).

Tolerances: dequantize mode computes the same float32 maths in another order: 1e-4 absolute
on logits of magnitude ~1 (observed: exact). In place, the base output carries the kernel's
error (bf16 for the int4 kernel types, see test_gguf_runtime); the adapter delta itself is float32.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qadapt
from qadapt.errors import AdapterError, FormatError, QadaptError

import models
from models import LORA_TARGETS, make_adapter, tiny_hf, write_quantized

pytest_plugins = ["fixtures_s3"]

ALL_TARGETS = LORA_TARGETS
IDS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(5))


def peft_logits(ref, folders: dict[str, Path], active: list[str], ids=IDS) -> torch.Tensor:
    return models.peft_logits(ref, folders, active, ids)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    cache = {}

    def get(qtype: str):
        if qtype not in cache:
            kw = dict(hidden_size=256, intermediate_size=512) if qtype.endswith("_K") else {}
            hf = tiny_hf("llama", seed=3, **kw)
            path = out / f"llama-{qtype}.gguf"
            ref = write_quantized(hf, path, qtype, seed=4)
            ads = {
                "a": make_adapter(ref, out / qtype / "a", 10),
                "b": make_adapter(ref, out / qtype / "b", 11, r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                "rs": make_adapter(ref, out / qtype / "rs", 12, use_rslora=True,
                                   rank_pattern={"v_proj": 2}, alpha_pattern={r"model\.layers\.1\.mlp\.down_proj": 3}),
                "head": make_adapter(ref, out / qtype / "head", 13, target_modules=["q_proj", "lm_head"]),
            }
            cache[qtype] = (path, ref, ads)
        return cache[qtype]

    return get


def _tol(mode: str, qtype: str, want: torch.Tensor) -> float:
    """Float32 maths in another order in both modes (the exact kernels in place): 1e-4, or 1e-5 of a large
    logit scale (the K-quant bases)."""
    return max(1e-4, 1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("mode", ["dequantize", "inplace"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "F32"])
@pytest.mark.parametrize("combo", [["a"], ["a", "b"], ["rs"], ["head"]])
def test_logits_match_peft(bases, qtype, mode, combo):
    """Single adapters, two at once, rsLoRA with rank/alpha patterns, lm_head (PEFT reference).

    q/k-targeting adapters on a GGUF whose q/k rows llama.cpp permuted."""
    path, ref, ads = bases(qtype)
    want = peft_logits(ref, ads, combo)
    m = qadapt.load(path, mode=mode, adapters={n: str(ads[n]) for n in combo})
    assert m.active_adapters == tuple(combo)
    got = m.logits(IDS)
    tol = _tol(mode, qtype, want)
    assert float((got - want).abs().max()) <= tol
    with torch.no_grad():
        base = ref(IDS).logits
    assert float((want - base).abs().max()) > 100 * max(tol, 1e-4) or mode == "inplace"  # the adapter matters


def test_switching_activation_and_unload(bases):
    """Switching at run time equals PEFT with that set; an inactive adapter has exactly zero effect."""
    path, ref, ads = bases("Q8_0")
    m = qadapt.load(path, mode="dequantize", adapters={n: str(ads[n]) for n in ("a", "b", "head")}, activate=[])
    base = m.logits(IDS)
    with torch.no_grad():
        torch.testing.assert_close(base, ref(IDS).logits, atol=1e-4, rtol=0)
    for combo in (["a"], ["b"], ["a", "b"], ["head"]):
        m.activate_adapters(combo)
        torch.testing.assert_close(m.logits(IDS), peft_logits(ref, ads, combo), atol=1e-4, rtol=0)
    m.activate_adapters([])
    assert torch.equal(m.logits(IDS), base)  # lm_head adapter loaded but inactive: exactly the base
    m.activate_adapters(["a", "b"])
    m.unload_adapter("b")
    assert m.active_adapters == ("a",)
    torch.testing.assert_close(m.logits(IDS), peft_logits(ref, ads, ["a"]), atol=1e-4, rtol=0)
    with pytest.raises(QadaptError, match="unknown adapter"):
        m.activate_adapters(["nope"])
    m.load_adapter("b2", str(ads["b"]), activate=True)
    torch.testing.assert_close(m.logits(IDS), peft_logits(ref, ads, ["a", "b"]), atol=1e-4, rtol=0)


def test_merge_and_unmerge_restore_exactly(bases):
    path, ref, ads = bases("Q8_0")
    m = qadapt.load(path, mode="dequantize", adapters={"a": str(ads["a"])}, activate=[])
    before = {k: v.clone() for k, v in m.decoder.state_dict().items()}
    m.activate_adapters(["a"])
    m.merge_adapters()
    torch.testing.assert_close(m.logits(IDS), peft_logits(ref, ads, ["a"]), atol=1e-4, rtol=1e-4)
    m.unmerge_adapters()
    after = m.decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(QadaptError, match="dequantize"):
        qadapt.load(path, mode="inplace", adapters={"a": str(ads["a"])}, merge=True)


def test_bin_adapter_and_hostile_pickle(bases, tmp_path):
    """``.bin`` adapters load through torch.load(weights_only=True); a code-running pickle is refused unrun."""
    from safetensors.torch import load_file

    path, ref, ads = bases("Q8_0")
    binf = tmp_path / "bin"
    binf.mkdir()
    (binf / "adapter_config.json").write_text((ads["a"] / "adapter_config.json").read_text())
    torch.save(load_file(str(ads["a"] / "adapter_model.safetensors")), binf / "adapter_model.bin")
    m = qadapt.load(path, mode="dequantize", adapters={"a": str(binf)})
    torch.testing.assert_close(m.logits(IDS), peft_logits(ref, ads, ["a"]), atol=1e-4, rtol=0)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "adapter_config.json").write_text((ads["a"] / "adapter_config.json").read_text())
    with open(evil / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(FormatError, match="refused"):
        qadapt.load(path, adapters={"evil": str(evil)})
    assert not marker.exists()


def test_adapter_errors_name_adapter_and_layer(bases, tmp_path):
    path, ref, ads = bases("Q8_0")
    other = tiny_hf("llama", seed=9, hidden_size=32, intermediate_size=64)
    wrong = make_adapter(other, tmp_path / "wrong", 1, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match=r"(?s)adapter `w`.*model\.layers\.0\.self_attn\.q_proj.*\(4, 32\).*in=64"):
        qadapt.load(path, adapters={"w": str(wrong)})
    # weights for a module the architecture does not have
    from safetensors.torch import load_file, save_file

    ghost = tmp_path / "ghost"
    ghost.mkdir()
    (ghost / "adapter_config.json").write_text((ads["a"] / "adapter_config.json").read_text())
    sd = load_file(str(ads["a"] / "adapter_model.safetensors"))
    sd = {k.replace("self_attn.q_proj", "self_attn.qq_proj"): v for k, v in sd.items() if "q_proj" in k}
    save_file(sd, str(ghost / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"(?s)change nothing.*qq_proj.*did you mean .*q_proj"):
        qadapt.load(path, adapters={"g": str(ghost)})  # its config targets q_proj: PEFT ignores qq_proj
    save_file({}, str(ghost / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="change nothing"):
        qadapt.load(path, adapters={"g": str(ghost)})


def test_ordering_with_adapter_model_id_and_preload(bases, tmp_path):
    """mistral.rs's convention: `order` names are sub-folders of adapter_model_id, preloads start inactive."""
    path, ref, ads = bases("Q8_0")
    import shutil

    root = tmp_path / "root"
    for n in ("a", "b"):
        shutil.copytree(ads[n], root / n)
    from qadapt.layer_maps import get_layer_map

    layers = {r.path: i for i, r in enumerate(get_layer_map("llama").enumerate_modules(2, ALL_TARGETS))}
    opath = tmp_path / "ordering.json"
    opath.write_text(json.dumps({"base_model_id": "tiny", "order": ["a", "b"], "layers": layers,
                                 "preload_adapters": [{"name": "h", "adapter_model_id": str(ads["head"])}]}))
    m = qadapt.load(path, mode="dequantize", ordering=opath, adapter_model_id=str(root))
    assert m.active_adapters == ("a", "b") and set(m.adapters) == {"a", "b", "h"}
    torch.testing.assert_close(m.logits(IDS), peft_logits(ref, ads, ["a", "b"]), atol=1e-4, rtol=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base_model_id": "tiny", "order": ["a"], "layers": {"model.layers.7.self_attn.q_proj": 0}}))
    with pytest.raises(AdapterError, match="block|layer"):
        qadapt.load(path, ordering=bad, adapter_model_id=str(root))


def test_s3_adapter_through_real_server(bases, s3_env):
    """S3: boto3 over HTTP to moto's server on loopback (no in-process mocking)."""
    path, ref, ads = bases("Q8_0")
    client = s3_env.client()
    client.create_bucket(Bucket="loras")
    for f in ads["a"].iterdir():
        client.put_object(Bucket="loras", Key=f"team/a/{f.name}", Body=f.read_bytes())
    m = qadapt.load(path, mode="dequantize", adapters={"a": "s3://loras/team/a"})
    torch.testing.assert_close(m.logits(IDS), peft_logits(ref, ads, ["a"]), atol=1e-4, rtol=0)
    with pytest.raises(QadaptError, match="s3://loras/team/missing"):
        m.load_adapter("x", "s3://loras/team/missing")


def test_hub_adapter_from_offline_cache(bases, monkeypatch, tmp_path):
    """The Hub path (huggingface_hub snapshot_download) from a pre-filled cache with HF_HUB_OFFLINE=1."""
    path, ref, ads = bases("Q8_0")
    commit = "b" * 40
    snap = tmp_path / "hub" / "models--someorg--tiny-lora" / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ads["a"].iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (tmp_path / "hub" / "models--someorg--tiny-lora" / "refs").mkdir()
    (tmp_path / "hub" / "models--someorg--tiny-lora" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    m = qadapt.load(path, mode="dequantize", adapters={"a": "someorg/tiny-lora"})
    torch.testing.assert_close(m.logits(IDS), peft_logits(ref, ads, ["a"]), atol=1e-4, rtol=0)


def test_cli_run_with_adapters(bases):
    path, ref, ads = bases("Q8_0")

    def cli(*a):
        return subprocess.run([sys.executable, "-m", "qadapt", "run", str(path), "-p", "the cat", "-n", "5",
                               "--json", *a], capture_output=True, text=True, timeout=300)

    r = cli("--adapter", f"a={ads['a']}", "--adapter", f"b={ads['b']}", "--activate", "a")
    assert r.returncode == 0, r.stderr
    m = qadapt.load(path, adapters={"a": str(ads["a"]), "b": str(ads["b"])}, activate=["a"])
    assert json.loads(r.stdout)["token_ids"] == m.generate("the cat", max_new_tokens=5).token_ids
    r = cli("--adapter", "a=/does/not/exist")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "/does/not/exist" in r.stderr


def test_the_one_step_never_applies_a_merged_adapter_twice(bases):
    """Model.step, which generate and the server's engine both run: a merged adapter named per row is not added
    again (the server used to apply it on top of the merged weights); PEFT with the adapter is the reference."""
    from qadapt.errors import InputError

    path, ref, ads = bases("Q8_0")
    m = qadapt.load(path, mode="dequantize", adapters={"a": str(ads["a"])}, merge=True)
    ids = IDS[:1]
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    want = peft_logits(ref, ads, ["a"], ids)[:, -1]
    for rows in (None, (("a",),)):
        got = m.step(ids, pos, m.new_cache(ids.shape[1]), rows)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    pytest.importorskip("starlette")
    from qadapt.server.app import Server

    with pytest.raises(InputError, match="merged into its weights"):
        Server(m, base_name="m")


def test_adapter_changes_wait_for_the_running_step(bases):
    """A step holds the model's lock: an unload from another thread (the server's request threads) lands after
    the step, never inside it."""
    import threading

    path, ref, ads = bases("Q8_0")
    m = qadapt.load(path, adapters={"a": str(ads["a"])})
    inside, release = threading.Event(), threading.Event()

    def hold(module, args):
        inside.set()
        release.wait(10)

    handle = m.decoder.register_forward_pre_hook(hold)
    ids = IDS[:1]
    stepper = threading.Thread(target=m.step, args=(ids, torch.arange(ids.shape[1]).unsqueeze(0),
                                                    m.new_cache(ids.shape[1])))
    stepper.start()
    assert inside.wait(10)
    unloader = threading.Thread(target=m.unload_adapter, args=("a",))
    unloader.start()
    unloader.join(0.3)
    assert unloader.is_alive() and "a" in m.adapters  # waiting for the step
    release.set()
    stepper.join(10)
    unloader.join(10)
    handle.remove()
    assert "a" not in m.adapters
