"""Train the demo: a small Llama base, one LoRA adapter per skill, and an X-LoRA classifier over them.

Everything is generated from a seed (:mod:`qadapt.demo.tasks`) and trained on the CPU with
transformers and PEFT (PEFT is a ``dev`` extra: only this module needs it; running the demo
does not). ``tools/make_demo.py`` is the entry point; the outputs land in ``qadapt/data/demo``:

- ``qadapt-demo.Q8_0.gguf``, ``qadapt-demo.Q4_0.gguf``: the base, tokenizer in its ``tokenizer.ggml.*`` metadata
- ``tokenizer.json``: the same tokenizer, for reference
- ``adapters/<skill>/``: PEFT LoRA adapters (``adapter_config.json``, ``adapter_model.safetensors``)
- ``adapters/xlora_config.json``, ``adapters/xlora_classifier.safetensors``: the X-LoRA classifier in
  the X-LoRA reference layout (tensors ``last.*``; adapters are the sub-folders, in ``adapters`` order)
- ``ordering-lora.json``, ``ordering-xlora.json``: mistral.rs ordering files
- ``MANIFEST.json``: seed, configuration, sizes, training losses, held-out scores
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import tasks

log = logging.getLogger(__name__)

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_ID = "qadapt-demo"  # base_model_id of the orderings, base_model_name_or_path of the adapters
EOS, BOS = "<|endoftext|>", "<s>"
QUANTS = ("Q8_0", "Q4_0")


@dataclass(frozen=True)
class DemoConfig:
    """What ``make_demo`` trains. Target: at most 15 minutes on 2 CPU cores.

    Tuned by experiment: a vocabulary big enough that every demo word is one token, one line
    per row (packing made the model mix lines up), and one thread (these matmuls are too small
    for two to help).
    """

    seed: int = 0
    vocab_size: int = 1024  # BPE target (digits stay single characters, so the result is a little smaller)
    hidden_size: int = 192
    intermediate_size: int = 512
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    context_length: int = 128
    base_lines: int = 120_000
    base_steps: int = 3000
    base_batch: int = 32
    base_lr: float = 2e-3
    lora_examples: int = 8000
    lora_steps: int = 600
    lora_batch: int = 32
    lora_lr: float = 3e-3
    lora_r: int = 8  # alpha = 2 r
    reverse_r: int = 16
    reverse_steps_factor: int = 3  # reversing a list is the hardest skill: 400 steps at r 8 left it at 2-6%
    xlora_steps: int = 2000  # a few seconds: the features are computed once
    xlora_batch: int = 512  # tokens per step (the routing loss is per token)
    xlora_lr: float = 5e-3
    xlora_temperature: float = 0.1  # trained at 1, shipped sharper: the top adapter gets ~all the weight
    xlora_depth: int = 2
    xlora_size: int = 64
    eval_prompts: int = 50
    threads: int = 1

    @classmethod
    def fast(cls, **kw) -> "DemoConfig":
        """A config for smoke tests of the pipeline (seconds, learns little)."""
        base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, base_lines=3000, base_steps=30,
                    base_batch=16, lora_examples=200, lora_steps=10, lora_batch=8, xlora_steps=5, xlora_batch=64, reverse_steps_factor=1,
                    eval_prompts=5)
        base.update(kw)
        return cls(**base)


# ---------------------------------------------------------------------------- tokenizer
@dataclass
class DemoTokenizer:
    """Byte-level BPE (GPT-2 style) whose merges never join a digit to anything: ``46`` is ``4``, ``6``."""

    tokens: list[str]
    merges: list[str]
    hf: Any = field(repr=False)  # tokenizers.Tokenizer

    @property
    def eos_id(self) -> int:
        return self.tokens.index(EOS)

    @property
    def bos_id(self) -> int:
        return self.tokens.index(BOS)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return ([self.bos_id] if bos else []) + self.hf.encode(text).ids

    def gguf_metadata(self) -> dict[str, Any]:
        return {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2",  # llama.cpp's name for ByteLevel(use_regex=True): GPT-2's regex
            "tokenizer.ggml.tokens": self.tokens,
            "tokenizer.ggml.token_type": [3 if t in (EOS, BOS) else 1 for t in self.tokens],
            "tokenizer.ggml.merges": self.merges,
            "tokenizer.ggml.bos_token_id": self.bos_id,
            "tokenizer.ggml.eos_token_id": self.eos_id,
            "tokenizer.ggml.add_bos_token": True,
        }


def _has_digit_merge(token: str) -> bool:
    """A token that joins a digit with anything but the byte-level space marker."""
    return any(c.isdigit() for c in token) and len(token.removeprefix("Ġ")) > 1


def build_tokenizer(corpus: Sequence[str], vocab_size: int) -> DemoTokenizer:
    """Train byte-level BPE on ``corpus`` with the ``tokenizers`` library (offline), digits kept apart."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    raw_merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw_merges]
    tokens = [t for t, _ in vocab if not _has_digit_merge(t)]
    keep = set(tokens)
    merges = [m for m in merges if m[0] in keep and m[1] in keep and m[0] + m[1] in keep]
    hf = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOS, BOS])
    return DemoTokenizer(tokens, [" ".join(m) for m in merges], hf)


# ---------------------------------------------------------------------------- training
def _hf_config(cfg: DemoConfig, tok: DemoTokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok.tokens), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.context_length,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, tie_word_embeddings=False,
        rms_norm_eps=1e-5, rope_theta=10000.0, use_cache=False, name_or_path=BASE_ID,
    )


def _batch(seqs: Sequence[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels; ``(ids, n)`` trains on ids[n:] only (the rest is context)."""
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, n) in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, n: len(s)] = torch.tensor(s[n:])
    return ids, labels


def _train(model, params, loss_at: Callable[[int], torch.Tensor], steps: int, lr: float, what: str) -> list[float]:
    """AdamW with linear warm-up and cosine decay on ``loss_at(step)``; returns the loss averaged over each tenth."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    curve, window, t0 = [], [], time.perf_counter()
    for step in range(steps):
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            curve.append(round(sum(window) / len(window), 4))
            log.info("%s: step %d/%d loss %.4f (%.0f s)", what, step + 1, steps, curve[-1], time.perf_counter() - t0)
            window = []
    model.eval()
    return curve


def _lm_loss(model, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


def train_base(cfg: DemoConfig, tok: DemoTokenizer, corpus: Sequence[str]):
    """A Llama-architecture causal LM trained from scratch on the generated corpus; returns (model, loss curve)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(_hf_config(cfg, tok)).float()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("base: %s parameters, vocabulary %d, %d lines of corpus", f"{n_params:,}", len(tok.tokens), len(corpus))
    rows = [tok.encode(line)[: cfg.context_length - 1] + [tok.eos_id] for line in corpus]  # one line per row
    rng = random.Random(cfg.seed)

    def loss_at(step):
        return _lm_loss(model, _batch([(r, 1) for r in rng.sample(rows, cfg.base_batch)], tok.eos_id))

    curve = _train(model, list(model.parameters()), loss_at, cfg.base_steps, cfg.base_lr, "base")
    return model, curve


def _task_seqs(tok: DemoTokenizer, examples: Sequence[tasks.Example]) -> list[tuple[list[int], int]]:
    """(prompt + answer + eos, prompt length): the loss is on the answer and the eos."""
    out = []
    for e in examples:
        prompt = tok.encode(e.prompt)
        full = tok.encode(e.text) + [tok.eos_id]
        if full[: len(prompt)] != prompt:
            raise RuntimeError(f"the prompt {e.prompt!r} tokenizes differently inside {e.text!r}")
        out.append((full, len(prompt)))
    return out


def _shared_prefix(tok: DemoTokenizer) -> int:
    """Tokens every demo prompt starts with (``<s>``, ``Q``, ``:``): no classifier can tell the skills apart there."""
    return len(tok.encode(tasks.PREFIX.strip()))


def train_lora(cfg: DemoConfig, base, tok: DemoTokenizer, skill: str, out: Path,
               anchor: Path | None = None) -> list[float]:
    """One PEFT LoRA adapter for ``skill`` on the float base, saved with ``save_pretrained``.

    With ``anchor`` (the first skill's adapter, frozen): in a random half of the batches the tokens
    every prompt shares (``<s>Q:``) get the anchor's delta instead of this adapter's own. Under X-LoRA
    those tokens cannot be routed by skill (nothing tells the skills apart yet), so the classifier
    sends them to the anchor, and every adapter has then seen exactly that; alone, each adapter still
    sees its own delta there in the other half. Without it the adapters depended on their own prefix
    delta: forcing the prefix to any one adapter cost the others most of their exact match (0.35-0.48).
    """
    import copy

    import peft

    torch.manual_seed(cfg.seed + 1 + tasks.SKILLS.index(skill))
    r = cfg.reverse_r if skill == "reverse" else cfg.lora_r
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    masks: dict[str, torch.Tensor | None] = {"default": None, "anchor": None}
    if anchor is not None:
        pm.load_adapter(str(anchor), adapter_name="anchor")
        pm.base_model.set_adapter(["default", "anchor"])
        for module in pm.modules():  # lora_B is linear: scaling lora_A's output per token scales the delta
            if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
                for name in masks:
                    module.lora_A[name].register_forward_hook(
                        lambda mod, inp, y, name=name: y if masks[name] is None else y * masks[name])
        for n, p in pm.named_parameters():
            p.requires_grad_(".default." in n and "lora_" in n)
    seqs = _task_seqs(tok, tasks.task_examples(skill, cfg.lora_examples, cfg.seed))
    rng = random.Random(f"lora/{skill}/{cfg.seed}")
    prefix = _shared_prefix(tok)
    params = [p for p in pm.parameters() if p.requires_grad]

    def loss_at(step):
        ids, labels = _batch(rng.sample(seqs, cfg.lora_batch), tok.eos_id)
        if anchor is not None:
            on_prefix = torch.zeros(*ids.shape, 1)
            on_prefix[:, :prefix] = 1.0
            swap = rng.random() < 0.5
            masks["default"], masks["anchor"] = (1 - on_prefix, on_prefix) if swap else (None, on_prefix * 0)
        return _lm_loss(pm, (ids, labels))

    steps = cfg.lora_steps * (cfg.reverse_steps_factor if skill == "reverse" else 1)
    curve = _train(pm, params, loss_at, steps, cfg.lora_lr, f"lora {skill}")
    from ..io import atomic_dir

    with atomic_dir(out, force=True) as tmp:  # PEFT writes the files itself: into a folder swapped in whole
        pm.save_pretrained(tmp, selected_adapters=["default"])
    return curve


def train_xlora(cfg: DemoConfig, base, tok: DemoTokenizer, folders: dict[str, Path], out: Path):
    """An X-LoRA classifier over the adapters, trained to route each skill's tokens to that skill's adapter.

    The classifier is PEFT's (``XLoraConfig``, adapter names "0", "1", ...: FIELD-NOTES) and sees what
    it sees at inference: the scaling pass's last hidden state at every position. With
    ``scaling_pass_value`` 0 that pass is the base alone, so the features are computed once with
    the base, and the classifier is trained on a routing loss: every token of a skill's example
    goes to that skill's adapter (``=>`` weighted as much as the whole answer: it alone decides the
    first answer token). End to end, through the language-model loss of the mixed adapters, it
    learned no routing here in 800 steps (held-out exact match 0-0.6 per skill).

    The tokens every prompt shares (``<s>Q:``, where no classifier can know the skill) go to the first
    adapter, the anchor the others were trained to accept there (:func:`train_lora`). The classifier
    is written in the X-LoRA reference layout next to the adapter folders. Returns (loss curve, the PEFT model).
    """
    import copy

    import peft

    names = list(folders)
    torch.manual_seed(cfg.seed + 100)
    model = copy.deepcopy(base)
    model.config.use_cache = False
    xcfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=cfg.hidden_size, xlora_depth=cfg.xlora_depth,
                            xlora_size=cfg.xlora_size, softmax_temperature=cfg.xlora_temperature,
                            adapters={str(i): str(folders[n]) for i, n in enumerate(names)})
    xm = peft.get_peft_model(model, xcfg)
    clf = xm.base_model.internal_xlora_classifier
    prefix = _shared_prefix(tok)

    anchor = 0  # names[0], the first skill: see train_lora

    feats, labels, weights = [], [], []
    with torch.no_grad():
        for i, skill in enumerate(names):
            seqs = _task_seqs(tok, tasks.task_examples(skill, cfg.lora_examples // 4, cfg.seed + 7))
            for j in range(0, len(seqs), 64):
                chunk = seqs[j: j + 64]
                h = base(input_ids=_batch(chunk, tok.eos_id)[0], output_hidden_states=True).hidden_states[-1]
                for k, (s, n) in enumerate(chunk):
                    feats.append(h[k, : len(s)])
                    y = torch.full((len(s),), i)
                    y[:prefix] = anchor
                    labels.append(y)
                    w = torch.ones(len(s))
                    w[n - 1] = len(s) - n  # "=>"
                    weights.append(w)
    X, Y, W = torch.cat(feats), torch.cat(labels), torch.cat(weights)
    log.info("x-lora classifier: %d tokens of %d skills", len(Y), len(names))
    rng = torch.Generator().manual_seed(cfg.seed + 101)

    def loss_at(step):
        ix = torch.multinomial(W, cfg.xlora_batch, replacement=True, generator=rng)
        return torch.nn.functional.cross_entropy(clf.layers(X[ix]), Y[ix])

    curve = _train(clf, list(clf.parameters()), loss_at, cfg.xlora_steps, cfg.xlora_lr, "x-lora classifier")
    write_xlora(out, clf, xcfg, names)
    return curve, xm


def write_xlora(folder: Path, classifier, xcfg, names: Sequence[str]) -> None:
    """``xlora_config.json`` + ``xlora_classifier.safetensors`` (``inner.{i}.*``, ``last.*``), reference layout."""
    from safetensors.torch import save

    from ..io import atomic_write, write_json

    linears = [m for m in classifier.layers if isinstance(m, torch.nn.Linear)]
    tensors = {}
    for i, lin in enumerate(linears):
        key = "last" if i == len(linears) - 1 else f"inner.{i}"
        tensors[f"{key}.weight"] = lin.weight.detach().float().contiguous()
        tensors[f"{key}.bias"] = lin.bias.detach().float().contiguous()
    atomic_write(folder / "xlora_classifier.safetensors", save(tensors), force=True)
    conf = {
        "hidden_size": xcfg.hidden_size, "adapters": {n: n for n in names}, "enable_softmax": xcfg.enable_softmax,
        "enable_softmax_topk": xcfg.enable_softmax_topk, "softmax_temperature": xcfg.softmax_temperature,
        "layerwise_scalings": xcfg.layerwise_scalings, "top_k_lora": xcfg.top_k_lora,
        "xlora_depth": xcfg.xlora_depth, "xlora_size": xcfg.xlora_size, "xlora_dropout_p": xcfg.xlora_dropout_p,
        "enable_relu_and_dropout": xcfg.xlora_depth > 1, "use_bias": True, "stop_token_id": None,
        "use_trainable_adapters": False, "use_mean_pool": False, "scaling_pass_value": xcfg.scaling_pass_value,
        "global_scaling_weight": xcfg.global_scaling_weight, "base_model_id": BASE_ID,
    }
    write_json(folder / "xlora_config.json", conf, force=True)


# ---------------------------------------------------------------------------- evaluation
def exact_match_hf(model, tok: DemoTokenizer, examples: Sequence[tasks.Example]) -> float:
    """Greedy exact-match of a transformers / PEFT model (teacher-forced, as ``run.exact_match``)."""
    from .run import teacher_forced_match

    model.eval()
    return teacher_forced_match(lambda ids: model(input_ids=ids).logits, tok.encode, tok.eos_id, examples)


# ---------------------------------------------------------------------------- the whole run
def make_demo(out: str | Path, cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Train everything and write the demo files to ``out``; returns the manifest."""
    from ..models.gguf_export import export_gguf
    from ..io import atomic_write, write_json
    from ..layer_maps import get_layer_map
    from ..ordering import create_ordering, write_ordering

    t_start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    (out / "adapters").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def lap(what: str, t0: float) -> float:
        timings[what] = round(time.perf_counter() - t0, 1)
        return time.perf_counter()

    t = time.perf_counter()
    corpus = tasks.base_corpus(cfg.base_lines, cfg.seed)
    task_text = [e.text for s in tasks.SKILLS for e in tasks.task_examples(s, 500, cfg.seed)]
    tok = build_tokenizer(corpus + task_text, cfg.vocab_size)
    atomic_write(out / "tokenizer.json", tok.hf.to_str(pretty=True), force=True)
    log.info("tokenizer: %d tokens, %d merges", len(tok.tokens), len(tok.merges))
    t = lap("tokenizer", t)

    base, base_curve = train_base(cfg, tok, corpus)
    t = lap("base", t)
    hf_cfg = base.config.to_dict()
    layer_map = get_layer_map("llama")
    ggufs = {}
    for q in QUANTS:
        ggufs[q] = export_gguf(base.state_dict(), hf_cfg, layer_map, out / f"{BASE_ID}.{q}.gguf", q,
                               tokenizer=tok.gguf_metadata(), force=True)
        log.info("wrote %s (%.2f MiB)", ggufs[q], ggufs[q].stat().st_size / 2**20)
    _check_gguf_tokenizer(ggufs["Q8_0"], tok, corpus[:500] + task_text[::10])

    folders, lora_curves = {}, {}
    for skill in tasks.SKILLS:  # the first is the anchor of the others' shared prefix (see train_lora)
        folders[skill] = out / "adapters" / skill
        anchor = folders[tasks.SKILLS[0]] if skill != tasks.SKILLS[0] else None
        lora_curves[skill] = train_lora(cfg, base, tok, skill, folders[skill], anchor)
    t = lap("lora", t)
    xlora_curve, xm = train_xlora(cfg, base, tok, folders, out / "adapters")
    t = lap("xlora", t)

    for kind, names in (("lora", tasks.SKILLS), ("xlora", tasks.SKILLS)):
        o = create_ordering(layer_map, cfg.num_hidden_layers, TARGETS, names, BASE_ID)
        write_ordering(out / f"ordering-{kind}.json", o, force=True)

    scores = evaluate(out, cfg.eval_prompts)
    mix = [e for s in tasks.SKILLS for e in tasks.held_out(s, max(1, cfg.eval_prompts // 4))]
    scores["xlora_peft_float"] = round(exact_match_hf(xm, tok, mix), 3)
    t = lap("evaluate", t)

    for f in out.rglob("*"):  # package data: readable by everyone (atomic writes create 0600 files)
        f.chmod(0o755 if f.is_dir() else 0o644)
    manifest = {
        "what": "qadapt demo: a small Llama base trained from scratch on a generated corpus, one LoRA per skill, "
                "an X-LoRA classifier over them (tools/make_demo.py)",
        "seed": cfg.seed,
        "config": asdict(cfg),
        "skills": {s: tasks.Example(s, x := tasks.INPUTS[s](random.Random(s)), tasks.solve(s, x)).text
                   for s in tasks.SKILLS},
        "prompt_format": "Q: <input> => <answer>; without an adapter the base echoes the input",
        "parameters": sum(p.numel() for p in base.parameters()),
        "vocabulary": len(tok.tokens),
        "files": {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
                  if p.is_file() and p.name != "MANIFEST.json"},
        "losses": {"base": base_curve, "lora": lora_curves, "xlora": xlora_curve},
        "xlora_prefix_adapter": tasks.SKILLS[0],
        "eval": {
            "measure": f"exact-match rate of greedy decoding with qadapt on {cfg.eval_prompts} held-out prompts "
                       "per skill (inputs never trained on), in place",
            "scores": scores,
        },
        "seconds": {**timings, "total": round(time.perf_counter() - t_start, 1)},
        "versions": _versions(),
    }
    manifest["total_bytes"] = sum(manifest["files"].values())
    write_json(out / "MANIFEST.json", manifest, force=True).chmod(0o644)
    log.info("done in %.0f s; %.1f MiB written to %s", manifest["seconds"]["total"],
             manifest["total_bytes"] / 2**20, out)
    return manifest


def _check_gguf_tokenizer(path: Path, tok: DemoTokenizer, texts: Sequence[str]) -> None:
    """The tokenizer qadapt builds from the GGUF metadata must encode exactly as the one trained on."""
    from ..formats.gguf import GGUFFile
    from ..tokenizer import Tokenizer

    qt = Tokenizer.from_gguf(GGUFFile(path))
    for text in texts:
        if qt.encode(text) != tok.encode(text):
            raise RuntimeError(f"the GGUF tokenizer encodes {text!r} as {qt.encode(text)}, training used "
                               f"{tok.encode(text)}")


def evaluate(folder: str | Path, n: int, quants: Sequence[str] = QUANTS, mode: str = "inplace",
             xlora: bool = True) -> dict[str, Any]:
    """Held-out exact-match with qadapt (greedy): base, each adapter and X-LoRA, per skill and quant type."""
    from .run import exact_match, load_demo

    scores: dict[str, Any] = {}
    for q in quants:
        m = load_demo(q, mode=mode, folder=folder)
        per = {}
        for skill in tasks.SKILLS:
            ex = tasks.held_out(skill, n)
            per[skill] = {"base": exact_match(m, ex, adapter=None), "adapter": exact_match(m, ex, adapter=skill)}
            log.info("%s %s: base %.2f, adapter %.2f", q, skill, per[skill]["base"], per[skill]["adapter"])
        scores[q] = per
        if xlora:
            from .run import _load_xlora, teacher_forced_match

            xm = _load_xlora(q, mode, folder)
            tk = xm.tokenizer
            per["xlora"] = {s: teacher_forced_match(xm.logits, tk.encode, tk.eos_ids[0], tasks.held_out(s, n))
                            for s in tasks.SKILLS}
            log.info("%s x-lora: %s", q, per["xlora"])
    return scores


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "peft", "tokenizers", "gguf")}
