"""Every LoRA kind PEFT 0.21.2 writes, on quantized bases, against PEFT on the dequantized base.

Adapters are made by PEFT itself (``get_peft_model`` + ``save_pretrained``) with non-trivial values in every
tensor it saves (B scaled up; DoRA magnitudes, saved modules and trainable-token rows perturbed), and the
reference is PEFT's ``PeftModel.from_pretrained`` over transformers with the base's dequantized weights (GGUF:
gguf-py's dequantization; GPTQ: GPTQ's formula; nf4: transformers' own bitsandbytes model, which PEFT wraps).

Kinds: DoRA, ``modules_to_save`` (the output layer), LoRA on the token embedding (with the ``base_layer``
table PEFT saves beside it), LoRA on the output layer (its ``base_layer`` too), ``trainable_token_indices``,
``lora_bias``, aLoRA (``alora_invocation_tokens``; PEFT finds the invocation in the input itself), and a
config that targets fewer modules than its file holds (PEFT ignores the rest).

Tolerances: dequantize mode is the same float32 maths in another order, 1e-4 on logits (observed 0 to 2e-5);
in place, the base's kernel error (the int4 kernel's bf16: ``models.int4_logit_tol``; nf4 and GPTQ as their
own tests state them), the adapters' parts being float32 on top. Each case checks that the adapter moves the
logits by far more than the tolerance.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import qadapt
from device_marks import require
from models import make_adapter, tiny_hf, write_quantized

pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

INVOKE = [10, 11]
IDS = torch.randint(12, 300, (2, 11), generator=torch.Generator().manual_seed(5))
IDS[0, 4:6] = torch.tensor(INVOKE)  # aLoRA's invocation mid-prompt in row 0, near the end in row 1
IDS[1, 7:9] = torch.tensor(INVOKE)
IDS[0, 1], IDS[1, 2] = 70, 5  # two of the trainable tokens ("tokens" below)

CASES = {
    "dora": dict(use_dora=True),
    "saved_head": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "embedding": dict(target_modules=["q_proj", "embed_tokens"]),
    "head_lora": dict(target_modules=["q_proj", "lm_head"]),
    "tokens": dict(target_modules=["q_proj"], trainable_token_indices=[3, 5, 7, 70]),
    "lora_bias": dict(lora_bias=True),
    "alora": dict(alora_invocation_tokens=INVOKE, task_type="CAUSAL_LM"),
}


def make(base, folder: Path, seed: int, **cfg) -> Path:
    return make_adapter(base, folder, seed, perturb=0.5, **cfg)


def peft_logits(ref, folder: Path, ids=IDS) -> torch.Tensor:
    from peft import PeftModel

    if isinstance(ref, BnbReference):
        return ref.peft(folder, ids)
    pm = PeftModel.from_pretrained(copy.deepcopy(ref), str(folder)).eval()
    with torch.no_grad():
        return pm(ids).logits


def base_logits(ref, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return (ref.fresh() if isinstance(ref, BnbReference) else ref)(ids).logits


class BnbReference:
    """nf4 references: PEFT over a fresh transformers bitsandbytes model (PEFT wraps it in place, and a bnb layer
    that has run carries bitsandbytes' CPU repacking). For DoRA, PEFT's own bnb path is not a reference on CPU:
    it dequantizes the weight for the norm after the layer has run, from the repacked data, and gets other
    numbers; there the reference is PEFT over the float32 model holding bitsandbytes' dequantization, and the
    tolerance adds the bnb kernel's measured deviation from that model (:meth:`kernel_error`)."""

    def __init__(self, fp, folder: Path):
        self.fp, self.folder = fp, folder

    def fresh(self):
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        return AutoModelForCausalLM.from_pretrained(self.folder, device_map="cpu", quantization_config=(
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32))).eval()

    def dequantized(self):
        import bitsandbytes.functional as bf

        ref, q = copy.deepcopy(self.fp), self.fresh()
        mods = dict(ref.named_modules())
        with torch.no_grad():
            for name, mod in q.named_modules():
                w = getattr(mod, "weight", None)
                if type(w).__name__ == "Params4bit":
                    mods[name].weight.copy_(bf.dequantize_4bit(w.data, w.quant_state).float())
        return ref.eval()

    def kernel_error(self, ids=IDS) -> float:
        with torch.no_grad():
            return float((self.fresh()(ids).logits - self.dequantized()(ids).logits).abs().max())

    def peft(self, folder: Path, ids) -> torch.Tensor:
        import json

        from peft import PeftModel

        dora = json.loads((folder / "adapter_config.json").read_text()).get("use_dora")
        pm = PeftModel.from_pretrained(self.dequantized() if dora else self.fresh(), str(folder)).eval()
        with torch.no_grad():
            return pm(ids).logits


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """base name -> (qadapt.load kwargs, the reference model, adapter folders made on the base's weights)."""
    out = tmp_path_factory.mktemp("peft-features")
    cache = {}

    def get(name: str):
        if name in cache:
            return cache[name]
        d = out / name
        d.mkdir()
        if name == "Q4_K":
            ref = write_quantized(tiny_hf("llama", seed=3, hidden_size=256, intermediate_size=512), d / "b.gguf",
                                  "Q4_K", seed=4)
            load, maker = dict(path=d / "b.gguf"), ref
        elif name == "Q4_0":  # gguf-py quantizes a real (normal) model: the default q8 kernels' regime
            ref = write_quantized(tiny_hf("llama", seed=3), d / "b.gguf", "Q4_0", seed=4)
            load, maker = dict(path=d / "b.gguf"), ref
        elif name == "gptq":
            from test_gptq import write_gptq_folder

            ref = write_gptq_folder(tiny_hf("llama", seed=1), d / "base", "4bit-actorder-asym-v1")
            load, maker = dict(path=d / "base"), ref
        else:  # nf4: quantized on load by bitsandbytes (as transformers does); reference: its dequantization
            pytest.importorskip("bitsandbytes")
            fp = tiny_hf("llama", seed=3)
            fp.save_pretrained(d / "fp")
            ref = BnbReference(fp, d / "fp")
            load, maker = dict(path=d / "fp", quant="nf4"), fp
        folders = {k: make(maker, d / k, seed=20 + i, **cfg) for i, (k, cfg) in enumerate(CASES.items())}
        folders["plain"] = make(maker, d / "plain", seed=40)
        cache[name] = (load, ref, folders)
        return cache[name]

    return get


def tolerance(base: str, mode: str, want: torch.Tensor, ref=None, case: str = "") -> float:
    if mode == "dequantize":
        return 1e-4
    if mode == "cuda":  # the GPU's float16 tensor-core prefill: 2^-10 relative per product (tests/test_triton.py)
        return 2e-3 * float(want.abs().max()) + 1e-4
    if mode == "auto":  # the default q8 kernels: activations rounded to 8 bits (tests/test_q8_kernels.py's bound)
        return 0.05 * float(want.abs().max())
    if base == "Q4_K":  # the exact kernels (the suite's default): float32 maths in another order
        return 1e-5 * float(want.abs().max()) + 1e-4
    if base == "gptq":
        return 0.02 * float(want.abs().max())  # tests/test_gptq.py's int4-kernel tolerance
    if case == "dora":  # against the dequantized model: the bnb kernel's own deviation, carried by g ~ 1
        return 1e-4 + 2 * ref.kernel_error()
    return 1e-4  # nf4: both sides run bitsandbytes' own kernel


MODES = [("Q4_K", "dequantize"), ("Q4_K", "inplace"), ("Q4_0", "auto"), ("gptq", "dequantize"), ("gptq", "inplace"),
         ("nf4", "inplace")]


def load_kw(load: dict, mode: str) -> dict:
    """qadapt.load's arguments for a base and a test mode (``auto``: in place on the default kernels; ``triton``:
    the device path, its GGUF kernels and slots, run on CPU under Triton's interpreter, exact float32 tiles)."""
    kw = {k: v for k, v in load.items() if k != "path"}
    if mode in ("triton", "cuda"):
        return {**kw, "mode": "inplace", **require(mode)}
    return {**kw, "mode": "inplace", "kernels": "auto"} if mode == "auto" else {**kw, "mode": mode}


@pytest.mark.parametrize("base,mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_each_kind_matches_peft(world, base, mode, case):
    load, ref, folders = world(base)
    want = peft_logits(ref, folders[case])
    plain = base_logits(ref)
    kw = load_kw(load, mode)
    m = qadapt.load(load["path"], adapters={case: str(folders[case])}, activate=[case], **kw)
    tol = tolerance(base, mode, want, ref, case)
    got = m.logits(IDS)
    err = float((got - want).abs().max())
    assert err <= tol, (case, base, mode, err, tol)
    effect = float((want - plain).abs().max())
    assert effect > 100 * 1e-4  # the kind moves the logits far above the float32 tolerance
    if mode != "dequantize":
        # the kernel bounds above are loose (their worst case); the adapter's own contribution is checked
        # sharper: its parts are float32, so what it adds may differ from PEFT's only through the base kernel's
        # error, measured here on the base alone
        ours_base = qadapt.load(load["path"], **kw).logits(IDS)
        base_err = float((ours_base - plain).abs().max())
        eff_err = float(((got - ours_base) - (want - plain)).abs().max())
        assert eff_err <= max(0.05 * effect, 3 * base_err + 1e-4), (case, base, eff_err, effect, base_err)
    assert m.adapters[case].nbytes > 0


@pytest.mark.parametrize("base,mode", [("Q4_K", "dequantize"), ("Q4_K", "inplace"), ("Q4_K", "triton"),
                                       ("Q4_K", "cuda"), ("Q4_0", "auto"), ("nf4", "inplace")])
def test_one_batch_mixes_every_kind_with_plain_rows(world, base, mode):
    """The server's path: one forward, each row its own adapter (or none), then a decode step; each row
    against PEFT with that row's adapter alone on the whole sequence (aLoRA rows keep their prompt's start).
    On the device path (``triton``) the plain row takes a slot and the others run the general path there."""
    load, ref, folders = world(base)
    names = [*CASES, "plain"]
    m = qadapt.load(load["path"], adapters={n: str(folders[n]) for n in names}, activate=[], **load_kw(load, mode))
    rows = tuple((n,) for n in names) + ((),)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(12, 300, (len(rows), 10), generator=g)
    ids[:, 3:5] = torch.tensor(INVOKE)
    nxt = torch.randint(12, 300, (len(rows), 1), generator=g)
    alora = tuple(m.alora_starts(r, ids[i].tolist()) or None for i, r in enumerate(rows))
    cache = m.new_cache(12, batch=len(rows))
    pos = torch.arange(10).expand(len(rows), 10)
    first = m.step(ids, pos, cache, rows, alora=alora)
    second = m.step(nxt, torch.full((len(rows), 1), 10), cache, rows, alora=alora)
    full = torch.cat([ids, nxt], 1)
    for i, r in enumerate(rows):
        want = peft_logits(ref, folders[r[0]], full[i:i + 1]) if r else base_logits(ref, full[i:i + 1])
        tol = tolerance(base, mode, want, ref, r[0] if r else "")
        assert float((first[i] - want[0, 9]).abs().max()) <= tol, (r, "prefill")
        assert float((second[i] - want[0, 10]).abs().max()) <= tol, (r, "decode")


def test_generate_with_alora_adapts_from_the_invocation(world):
    """Model.generate: an aLoRA adapter applies from its invocation in the prompt through every new token
    (greedy tokens equal PEFT's generate, which computes the same offsets)."""
    from peft import PeftModel

    load, ref, folders = world("gptq")  # an ordinary init: the adapter changes greedy tokens
    m = qadapt.load(load["path"], mode="dequantize", adapters={"x": str(folders["alora"])}, activate=["x"])
    prompt = IDS[0].tolist()
    got = m.generate(prompt, max_new_tokens=6).token_ids
    pm = PeftModel.from_pretrained(copy.deepcopy(ref), str(folders["alora"])).eval()
    with torch.no_grad():
        want = pm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert got == want
    without = qadapt.load(load["path"], mode="dequantize").generate(prompt, max_new_tokens=6).token_ids
    assert got != without


# ---------------------------------------------------------------------------------------------- matching
FH_FORMS = {
    "names": lambda t: dict(target_modules=t[:2]),
    "all-linear": lambda t: dict(target_modules="all-linear"),
    "regex": lambda t: dict(target_modules=rf".*\.1\..*({t[0]}|{t[-2]})"),
    "excluded": lambda t: dict(target_modules="all-linear", exclude_modules=[t[0]]),
    "layers": lambda t: dict(target_modules=t[:-1], layers_to_transform=[1], layers_pattern=["layers", "h"]),
    "embedding": lambda t: dict(target_modules=[t[0], "embed_tokens", "wte"]),
}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2"])
@pytest.mark.parametrize("form", list(FH_FORMS))
def test_targets_equal_peft_on_every_layer_map(arch, form):
    """What qadapt applies (its plan: LoRA targets and the embedding) equals what PEFT's own injection wraps."""
    import foundation_helpers as fh
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from qadapt.adapters.loading import plan_adapter
    from qadapt.adapters.peft_format import LoraAdapterConfig
    from qadapt.layer_maps import get_layer_map

    kwargs = FH_FORMS[form](fh.ALL_TARGETS[arch])
    model = fh.tiny_model(arch)
    lm = get_layer_map({"gemma3_text": "gemma3"}.get(arch, arch))
    try:
        wrapped = inject_adapter_in_model(LoraConfig(**kwargs), copy.deepcopy(model))
    except ValueError as e:
        theirs, refused = set(), str(e)
    else:
        theirs = {n for n, mod in wrapped.named_modules() if isinstance(mod, LoraLayer)}
        refused = None
    cfg = LoraAdapterConfig.from_dict(kwargs)
    plan = plan_adapter(cfg, lm, {"num_hidden_layers": model.config.num_hidden_layers})
    ours = set(plan.targets) | ({lm.embedding_path} if plan.embedding_lora else set())
    assert ours == theirs, (arch, form, sorted(ours ^ theirs))
    assert bool(plan.problems) == bool(refused), (plan.problems, refused)


def test_file_beyond_its_config_and_foreign_targets(world, tmp_path):
    """A config that targets q_proj over a file with all seven linears: PEFT wraps q_proj only and ignores the
    rest, and so does qadapt; GPT-2's names on a Llama: PEFT refuses ("not found"), so does qadapt (and check)."""
    import json
    import shutil

    from qadapt.errors import AdapterError

    load, ref, folders = world("Q4_K")
    narrow = shutil.copytree(folders["plain"], tmp_path / "narrow")
    cfg = json.loads((narrow / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (narrow / "adapter_config.json").write_text(json.dumps(cfg))
    want = peft_logits(ref, narrow)
    m = qadapt.load(load["path"], mode="dequantize", adapters={"n": str(narrow)}, activate=["n"])
    assert float((m.logits(IDS) - want).abs().max()) <= 1e-4
    assert set(m.adapters["n"].factors) == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    cfg["target_modules"] = ["c_attn", "c_proj"]
    (narrow / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="match no layer"):
        qadapt.load(load["path"], adapters={"n": str(narrow)})


def test_tied_output_layer_takes_the_trainable_tokens(tmp_path):
    """A model whose output layer is its token table (tie_word_embeddings): PEFT applies trainable tokens to
    both; so does qadapt."""
    hf = tiny_hf("llama", seed=4, tie_word_embeddings=True)
    path = tmp_path / "tied"
    hf.save_pretrained(path)
    folder = make(hf, tmp_path / "tt", seed=3, target_modules=["q_proj"], trainable_token_indices=[3, 5, 70])
    want = peft_logits(hf, folder)
    m = qadapt.load(path, mode="dequantize", adapters={"t": str(folder)}, activate=["t"])
    assert m.config.tie_embeddings
    assert float((m.logits(IDS) - want).abs().max()) <= 1e-4


def test_check_reports_what_each_adapter_carries(world, tmp_path):
    import json

    from qadapt.check import check_ordering

    load, ref, folders = world("Q4_K")
    order = tmp_path / "ordering.json"
    order.write_text(json.dumps({"order": ["dora", "tokens"], "base_model_id": None}))
    r = check_ordering(order, model=str(load["path"]), adapters=[("dora", str(folders["dora"])),
                                                                 ("tokens", str(folders["tokens"]))])
    assert r.valid, r.lines()
    assert r.adapters["dora"]["dora_modules"] == 14 and r.adapters["dora"]["lora_modules"] == 14
    assert r.adapters["tokens"]["trainable_tokens"] == 4 and r.adapters["tokens"]["lora_modules"] == 2
    assert any("adapter tokens:" in line for line in r.lines())


# ---------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("kind", ["LoHa", "LoKr"])
def test_other_peft_types_are_refused_with_the_hint_then_converted(tmp_path, kind):
    """A LoHa / LoKr adapter: refused by name with the conversion hint; ``qadapt adapters convert`` (PEFT's
    convert_to_lora on a zero-byte skeleton of the base) gives a LoRA whose logits equal PEFT's with the
    original adapter (``--rank 1.0`` keeps all of each delta's energy: exact up to the SVD's float32 error,
    1e-4 on logits)."""
    import subprocess
    import sys

    import peft

    from models import write_gguf
    from qadapt.errors import AdapterError

    hf = tiny_hf("llama", seed=2)
    gguf = write_gguf(hf, tmp_path / "base.gguf")
    cls = getattr(peft, f"{kind}Config")
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(hf), cls(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                    init_weights=False))
    pm.save_pretrained(tmp_path / "orig")
    with pytest.raises(AdapterError, match=r"peft_type.*convert_to_lora.*qadapt adapters convert"):
        qadapt.load(gguf, adapters={"x": str(tmp_path / "orig")})
    r = subprocess.run([sys.executable, "-m", "qadapt", "adapters", "convert", str(tmp_path / "orig"),
                        str(tmp_path / "lora"), "--model", str(gguf), "--rank", "1.0", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        want = pm.eval()(IDS).logits
        plain = hf(IDS).logits
    m = qadapt.load(gguf, mode="dequantize", adapters={"x": str(tmp_path / "lora")}, activate=["x"])
    assert float((m.logits(IDS) - want).abs().max()) <= 1e-4
    assert float((want - plain).abs().max()) > 1e-2
    if kind == "LoHa":
        again = subprocess.run([sys.executable, "-m", "qadapt", "adapters", "convert", str(tmp_path / "orig"),
                                str(tmp_path / "lora"), "--model", str(gguf)], capture_output=True, text=True,
                               timeout=300)
        assert again.returncode != 0 and "--force" in again.stderr  # never overwritten silently
