"""X-LoRA on GGUF bases against PEFT's X-LoRA on transformers with the gguf-py-dequantized weights.

Reference: ``peft.get_peft_model(model, XLoraConfig(...))`` built in memory over the transformers
model whose weights are gguf-py's dequantization of the file (tests/models.py), with 3 random
PEFT LoRA experts (FIELD-NOTES: PEFT needs the names "0", "1", ... and use_cache False, and its
save_pretrained drops layers of a deep classifier, so both checkpoint layouts are written here
from the in-memory classifier). The experts target different module sets, so the classifier's
rows (PEFT's enumeration of wrapped modules) are exercised.

Tolerances: F32 and Q8_0 bases (both modes: Q8_0 in place dequantizes blockwise in float32) compute
the same float32 maths as PEFT in another order: 1e-4 absolute on logits of magnitude ~1 and 1e-5
on scalings (observed ~1e-6). Greedy token ids must be equal.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import qadapt
from qadapt.errors import AdapterError, FormatError, QadaptError, UnsupportedError

from device_marks import require
from models import make_adapter, tiny_hf, write_quantized

pytest_plugins = ["fixtures_s3"]

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = [ALL, ["q_proj", "v_proj", "down_proj"], ["o_proj", "up_proj"]]
NAMES = ["alpha", "beta", "gamma"]  # reference-layout names (PEFT's must be "0", "1", "2")
IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(7))
ATOL = 1e-4

CONFIGS = {
    # depth 1, one scaling per token for all layers, sharp softmax, non-zero scaling pass (adapters on in pass 1)
    "d1-global": dict(xlora_depth=1, softmax_temperature=0.5, scaling_pass_value=0.3),
    # depth 2, per-layer scalings, top-2 of 3 without re-normalising, global weight 1.7
    "d2-layerwise-topk": dict(xlora_depth=2, xlora_size=32, layerwise_scalings=True, top_k_lora=2,
                              global_scaling_weight=1.7),
    # depth 3, raw logits (no softmax) then softmax over the top 2
    "d3-topk-softmax": dict(xlora_depth=3, xlora_size=16, top_k_lora=2, enable_softmax=False,
                            enable_softmax_topk=True, xlora_dropout_p=0.0),
}


def make_lora(base, out: Path, seed: int, targets) -> Path:
    return make_adapter(base, out, seed, b_scale=4, target_modules=targets)


def peft_xlora(ref, loras: list[Path], seed: int, **cfg):
    """PEFT's X-LoRA in memory; the classifier's last layer scaled up so scalings vary visibly per token."""
    import peft

    base = copy.deepcopy(ref)
    base.config.use_cache = False
    torch.manual_seed(seed)
    xc = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                          adapters={str(i): str(p) for i, p in enumerate(loras)}, **cfg)
    pm = peft.get_peft_model(base, xc).eval()
    with torch.no_grad():
        last = [m for m in classifier_linears(pm)][-1]
        last.weight.mul_(6)
        last.bias.normal_()
    return pm


def classifier_linears(pm) -> list[torch.nn.Linear]:
    return [m for m in pm.base_model.internal_xlora_classifier.layers if isinstance(m, torch.nn.Linear)]


def write_reference_layout(pm, loras: list[Path], out: Path, spaced: bool) -> Path:
    """xlora_config.json + xlora_classifier.safetensors (inner.{i}, last) + one sub-folder per adapter name.

    ``spaced``: inner layers numbered by ModuleList slot, as the X-LoRA reference saves them when ReLU and
    Dropout take slots; otherwise 0, 1, ... as mistral.rs reads them.
    """
    from safetensors.torch import save_file

    cfg = pm.peft_config["default"]
    out.mkdir(parents=True)
    lin = classifier_linears(pm)
    tensors = {}
    for i, m in enumerate(lin[:-1]):
        k = 3 * i if spaced else i
        tensors[f"inner.{k}.weight"], tensors[f"inner.{k}.bias"] = m.weight.detach(), m.bias.detach()
    tensors["last.weight"], tensors["last.bias"] = lin[-1].weight.detach(), lin[-1].bias.detach()
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "xlora_classifier.safetensors")
    keys = ["hidden_size", "enable_softmax", "enable_softmax_topk", "softmax_temperature", "layerwise_scalings",
            "top_k_lora", "xlora_depth", "xlora_size", "xlora_dropout_p", "use_trainable_adapters",
            "scaling_pass_value", "global_scaling_weight"]
    conf = {k: getattr(cfg, k) for k in keys}
    conf.update(adapters=NAMES[: len(loras)], enable_relu_and_dropout=True, use_bias=True, base_model_id="tiny")
    (out / "xlora_config.json").write_text(json.dumps(conf))
    for name, src in zip(NAMES, loras):
        shutil.copytree(src, out / name)
    return out


def write_peft_layout(pm, loras: list[Path], out: Path) -> Path:
    """PEFT's save_pretrained, with the whole classifier state put back (PEFT drops layers of deep ones) and
    the experts' own LoRA folders as sub-folders "0", "1", ... (PEFT 0.21 writes them broken: see
    test_lm_head_and_bad_checkpoints_refused)."""
    from safetensors.torch import save_file

    pm.save_pretrained(out)
    for i, src in enumerate(loras):
        shutil.rmtree(out / str(i))
        shutil.copytree(src, out / str(i))
    state = {f"base_model.internal_xlora_classifier.{k}": v.detach().contiguous()
             for k, v in pm.base_model.internal_xlora_classifier.state_dict().items()}
    save_file(state, out / "adapter_model.safetensors")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(gguf path, transformers reference, LoRA folders) per base type; PEFT X-LoRA + both layouts per config."""
    root = tmp_path_factory.mktemp("xlora")
    hf = tiny_hf("llama", seed=3)
    bases, built = {}, {}

    def base(qtype):
        if qtype not in bases:
            path = root / f"llama-{qtype}.gguf"
            ref = write_quantized(hf, path, qtype, seed=4)
            loras = [make_lora(ref, root / qtype / f"lora{i}", 20 + i, t) for i, t in enumerate(TARGETS)]
            bases[qtype] = (path, ref, loras)
        return bases[qtype]

    def get(qtype, cfg_name):
        key = (qtype, cfg_name)
        if key not in built:
            path, ref, loras = base(qtype)
            pm = peft_xlora(ref, loras, seed=30, **CONFIGS[cfg_name])
            d = root / qtype / cfg_name
            ref_layout = write_reference_layout(pm, loras, d / "xlora", spaced=cfg_name.startswith("d3"))
            peft_layout = write_peft_layout(pm, loras, d / "peft")
            built[key] = (path, pm, ref_layout, peft_layout)
        return built[key]

    get.base = base
    return get


def cli(*args):
    """The click command line in process (the same entry point as ``python -m qadapt``)."""
    from click.testing import CliRunner

    from qadapt.cli import main

    return CliRunner().invoke(main, list(args))


def peft_forward(pm, ids):
    with torch.no_grad():
        logits = pm(ids).logits
    return logits, pm.get_latest_scalings()


@pytest.mark.parametrize("mode", ["dequantize", "inplace"])
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_logits_and_scalings_match_peft(world, qtype, mode, cfg):
    """Both checkpoint layouts give PEFT's logits and scalings (tolerances in the module docstring)."""
    path, pm, ref_layout, peft_layout = world(qtype, cfg)
    want, want_s = peft_forward(pm, IDS)
    assert want_s.shape == (2, 9, 14, 3)  # PEFT expands to n_layers = 7 wrapped modules x 2 blocks
    for folder in (ref_layout, peft_layout):
        m = qadapt.load(path, mode=mode, xlora=str(folder))
        got = m.logits(IDS)
        s = m.xlora_scalings()
        assert s.dtype == torch.float32
        layerwise = CONFIGS[cfg].get("layerwise_scalings", False)
        assert s.shape == (2, 9, 14 if layerwise else 1, 3)
        torch.testing.assert_close(s, want_s[:, :, : s.shape[2]], atol=1e-5, rtol=0)
        assert float((got - want).abs().max()) <= ATOL, folder
    # teeth: the scalings vary per token, and the experts move the logits
    assert float(want_s.std(dim=1).mean()) > 0.05
    with pm.disable_adapter(), torch.no_grad():
        base = pm(IDS).logits
    assert float((want - base).abs().max()) > 100 * ATOL


def test_ordering_matches_and_wrong_order_refused(world, tmp_path):
    """An ordering with the training order and PEFT's rows gives the same model; a wrong order is refused."""
    from qadapt.layer_maps import get_layer_map
    from qadapt.ordering import create_ordering, write_ordering

    path, pm, ref_layout, _ = world("Q8_0", "d2-layerwise-topk")
    lm = get_layer_map("llama")
    good = write_ordering(tmp_path / "good.json", create_ordering(lm, 2, ALL, NAMES, "tiny"))
    m = qadapt.load(path, mode="dequantize", xlora=str(ref_layout), ordering=good)
    torch.testing.assert_close(m.logits(IDS), peft_forward(pm, IDS)[0], atol=ATOL, rtol=0)

    cases = {
        "swapped.json": (dict(order=["beta", "alpha", "gamma"]), "training order"),
        "unknown.json": (dict(order=["alpha", "beta", "delta"]), "delta"),
        "short.json": (dict(order=["alpha", "beta"]), "3 classes"),
        "layers.json": (dict(layers_targets=["q_proj", "v_proj"]), "n_layers = 14"),
    }
    for fname, (spec, msg) in cases.items():
        o = create_ordering(lm, 2, spec.get("layers_targets", ALL), spec.get("order", NAMES), "tiny")
        f = write_ordering(tmp_path / fname, o)
        with pytest.raises(AdapterError, match=msg):
            qadapt.load(path, mode="dequantize", xlora=str(ref_layout), ordering=f)


@pytest.mark.parametrize("cfg", ["d1-global", "d2-layerwise-topk"])
def test_greedy_generation_with_kv_caches_matches_peft(world, cfg):
    """Our two cached passes vs PEFT without cache (a full forward per token); same greedy tokens."""
    path, pm, ref_layout, _ = world("Q8_0", cfg)
    prompt = IDS[0, :6].tolist()
    n = 8
    ids = torch.tensor([prompt])
    want = []
    for _ in range(n):
        with torch.no_grad():
            tok = int(pm(ids).logits[0, -1].argmax())
        if tok == 0:  # eos of the tiny models
            break
        want.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    m = qadapt.load(path, mode="inplace", xlora=str(ref_layout))
    assert m.generate(prompt, max_new_tokens=n).token_ids == want
    assert m._xlora.scaling_passes == len(want) + (len(want) < n)


@pytest.mark.parametrize("where", ["triton", "cuda"])
def test_device_path_matches_peft(world, where):
    """X-LoRA on the device path (its classifier and experts there, GGUF weights on the Triton kernels): the
    logits and scalings against PEFT, then greedy decoding with both KV caches against PEFT's full forwards.
    ``triton``: the CPU interpreter, exact float32 tiles (ATOL as above); ``cuda``: float16 tensor-core tiles,
    2e-3 of the logit scale (tests/test_triton.py's bound)."""
    kw = require(where)
    path, pm, ref_layout, _ = world("Q8_0", "d2-layerwise-topk")
    m = qadapt.load(path, xlora=str(ref_layout), **kw)
    want, want_s = peft_forward(pm, IDS)
    got = m.logits(IDS)
    tol = ATOL if where == "triton" else 2e-3 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol
    torch.testing.assert_close(m.xlora_scalings().cpu(), want_s, atol=1e-5 if where == "triton" else 2e-3, rtol=0)
    if where == "triton":
        prompt = IDS[0, :6].tolist()
        ids, toks = torch.tensor([prompt]), []
        for _ in range(5):
            with torch.no_grad():
                toks.append(int(pm(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[toks[-1]]])], dim=1)
        assert m.generate(prompt, max_new_tokens=5).token_ids == toks


def _frozen_reference(pm, ids: torch.Tensor, freeze_at: int) -> torch.Tensor:
    """PEFT's last-position logits with the scalings of positions after ``freeze_at`` replaced by those at it."""
    clf = pm.base_model.internal_xlora_classifier
    orig = clf.forward

    def frozen(*a, **kw):
        s = orig(*a, **kw)
        if s.shape[1] > freeze_at + 1:
            s = s.clone()
            s[:, freeze_at + 1:] = s[:, freeze_at : freeze_at + 1]
        return s

    clf.forward = frozen
    try:
        with torch.no_grad():
            return pm(ids).logits[:, -1]
    finally:
        clf.forward = orig


def test_non_granular_scalings_freeze_per_row(world):
    """tgt_non_granular_index=k: the k-th generated token's scalings are reused after it (reference: PEFT with
    the scalings of later positions replaced by those at the freeze position); the scaling pass is skipped."""
    path, pm, ref_layout, _ = world("Q8_0", "d1-global")
    k, steps = 2, 6
    m = qadapt.load(path, mode="dequantize", xlora=str(ref_layout), tgt_non_granular_index=k)
    prompt = IDS[:, :5]
    P = prompt.shape[1]
    cache = m.new_cache(P + steps, batch=2)
    ids, pos, seq = prompt, torch.arange(P).expand(2, P), prompt
    differs = False
    for step in range(steps):
        logits = m.step(ids, pos, cache)
        want = _frozen_reference(pm, seq, P + k - 1)
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)
        with torch.no_grad():
            differs |= float((pm(seq).logits[:, -1] - want).abs().max()) > 1e-3
        tok = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, tok], dim=1)
        ids, pos = tok, pos[:, -1:] + 1
    assert differs  # freezing changed the outputs: the comparison has teeth
    assert m._xlora.scaling_passes == 1 + k  # prefill + k decode steps; the rest reuse the frozen scalings
    assert all(r.frozen is not None for r in cache.rows)
    # per row: resetting row 0 brings its scaling pass back, row 1 keeps its frozen scalings
    frozen1 = cache.rows[1].frozen.clone()
    cache.reset_rows([0])
    assert cache.rows[0].frozen is None and torch.equal(cache.rows[1].frozen, frozen1)
    m.step(ids, pos, cache)
    assert m._xlora.scaling_passes == 2 + k
    assert torch.equal(m.xlora_scalings()[1], frozen1)


def test_lm_head_and_bad_checkpoints_refused(world, tmp_path):
    """lm_head experts are refused (as in mistral.rs); a truncated PEFT save and a LoRA folder are named."""
    path, pm, ref_layout, peft_layout = world("Q8_0", "d3-topk-softmax")
    _, ref, loras = world.base("Q8_0")
    bad = tmp_path / "head"
    shutil.copytree(ref_layout, bad)
    shutil.rmtree(bad / "gamma")
    make_lora(ref, bad / "gamma", 40, ["o_proj", "lm_head"])
    with pytest.raises(AdapterError, match="lm_head"):
        qadapt.load(path, xlora=str(bad))

    # PEFT's own saves: a depth-3 classifier loses layers.0, a depth-1 one is empty, the experts are mixed up
    pm.save_pretrained(tmp_path / "trunc")
    with pytest.raises(FormatError, match="xlora_depth is 3. PEFT's X-LoRA save_pretrained"):
        qadapt.load(path, xlora=str(tmp_path / "trunc"))
    _, pm1, _, _ = world("Q8_0", "d1-global")
    own = tmp_path / "peft-own"
    pm1.save_pretrained(own)
    with pytest.raises(FormatError, match="classifier is missing. PEFT's X-LoRA save_pretrained"):
        qadapt.load(path, xlora=str(own))
    from safetensors.torch import save_file

    save_file({f"base_model.internal_xlora_classifier.{k}": v.contiguous()
               for k, v in pm1.base_model.internal_xlora_classifier.state_dict().items()},
              own / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="non-LoRA tensors"):
        qadapt.load(path, xlora=str(own))
    with pytest.raises(AdapterError, match="not XLORA"):
        qadapt.load(path, xlora=str(loras[0]))
    with pytest.raises(UnsupportedError, match="X-LoRA"):
        qadapt.load(path, xlora=str(ref_layout), adapters={"x": str(loras[0])})
    with pytest.raises(QadaptError, match="X-LoRA only"):
        qadapt.load(path, tgt_non_granular_index=1)
    m = qadapt.load(path, xlora=str(peft_layout))
    with pytest.raises(UnsupportedError):
        m.activate_adapters(["0"])


def test_check_reports_xlora_problems(world, tmp_path):
    """``qadapt check --xlora``: classes, n_layers, adapter names, lm_head, as problems with codes."""
    from qadapt.check import check_ordering
    from qadapt.layer_maps import get_layer_map
    from qadapt.ordering import create_ordering, write_ordering

    path, _, ref_layout, _ = world("Q8_0", "d2-layerwise-topk")
    lm = get_layer_map("llama")
    good = write_ordering(tmp_path / "good.json", create_ordering(lm, 2, ALL, NAMES, "tiny"))
    report = check_ordering(good, model=str(path), xlora=str(ref_layout))
    assert report.valid, report.lines()
    bad = write_ordering(tmp_path / "bad.json", create_ordering(lm, 2, ALL + ["lm_head"], ["beta", "alpha"], "tiny"))
    codes = {p.code for p in check_ordering(bad, model=str(path), xlora=str(ref_layout)).problems}
    assert {"xlora-order-classes", "xlora-lm-head", "xlora-n-layers"} <= codes
    r = cli("check", str(bad), "--model", str(path), "--xlora", str(ref_layout), "--json")
    assert r.exit_code == 1 and "xlora-lm-head" in r.stdout, r.output


def test_cli_run_and_s3_source(world, s3_env):
    """``qadapt run --xlora`` equals the API; an X-LoRA checkpoint from S3 (moto over HTTP) equals the local one."""
    path, _, ref_layout, _ = world("Q8_0", "d1-global")
    client = s3_env.client()
    client.create_bucket(Bucket="xlora-ck")
    for f in ref_layout.rglob("*"):
        if f.is_file():
            client.put_object(Bucket="xlora-ck", Key=f"ck/{f.relative_to(ref_layout)}", Body=f.read_bytes())
    m = qadapt.load(path, xlora=str(ref_layout), tgt_non_granular_index=1)
    want = m.generate("the cat", max_new_tokens=6).token_ids
    m3 = qadapt.load(path, xlora="s3://xlora-ck/ck", tgt_non_granular_index=1)
    assert m3.generate("the cat", max_new_tokens=6).token_ids == want
    r = cli("run", str(path), "-p", "the cat", "-n", "6", "--json", "--xlora", str(ref_layout),
            "--tgt-non-granular-index", "1")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["token_ids"] == want


def test_server_refuses_an_xlora_model(world):
    """The batched engine runs plain LoRA rows: an X-LoRA model is refused when the server is built (it used to
    be served without its classifier), and Model.step refuses per-row adapter sets on it."""
    pytest.importorskip("starlette")
    from qadapt.errors import QadaptError, UnsupportedError
    from qadapt.server.app import Server

    path, pm, ref_layout, _ = world("Q8_0", next(iter(CONFIGS)))
    m = qadapt.load(path, xlora=str(ref_layout))
    with pytest.raises(UnsupportedError, match="X-LoRA"):
        Server(m, base_name="x")
    ids = IDS[:1]
    with pytest.raises(QadaptError, match="X-LoRA"):
        m.step(ids, torch.arange(ids.shape[1]).unsqueeze(0), m.new_cache(ids.shape[1]), (("alpha",),))


def test_decode_on_the_default_kernels_takes_the_native_path(world, monkeypatch):
    """X-LoRA decode on the q8 kernels: each step's expert deltas go into the fused native calls (one entry
    per row and expert, scaled by that step's scalings). Reference: the same q8 model with the deltas added
    per expert in torch (:meth:`XLoraScalings.apply`, itself equal to PEFT above): the bases are the same bytes and
    kernels and the deltas differ in float32 summation order only, but a later layer rounds its input to 8 bits
    per block of 32, so an ulp can move one value across a rounding boundary (one step: the block's max/127):
    1e-3 of the logit scale (measured 3.3e-5), greedy tokens equal."""
    from qadapt.adapters import xlora as xl

    path, _, ref_layout, _ = world("Q8_0", "d2-layerwise-topk")
    prompt = IDS[0, :6].tolist()
    calls = {"n": 0}
    orig = xl.XLoraScalings.native_entries

    def counted(self, layer, m):
        got = orig(self, layer, m)
        calls["n"] += got is not None and len(got) > 0
        return got

    def run(native: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(xl.XLoraScalings, "native_entries", counted if native else (lambda self, layer, m: None))
        m = qadapt.load(path, mode="inplace", kernels="q8", xlora=str(ref_layout))
        cache = m.new_cache(16)
        out = [m.step(torch.tensor([prompt]), torch.arange(6)[None], cache)]
        for t in range(4):
            tok = int(out[-1].argmax())
            out.append(m.step(torch.tensor([[tok]]), torch.tensor([[6 + t]]), cache))
        return out

    fast, slow = run(True), run(False)
    assert calls["n"] > 0  # the native entries were used
    for a, b in zip(fast, slow):
        assert float((a - b).abs().max()) <= 1e-3 * float(b.abs().max())
        assert int(a.argmax()) == int(b.argmax())
