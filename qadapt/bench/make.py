"""Make (or reuse) the benchmark model and adapters, cached under ``~/.cache/qadapt/bench``.

One folder per model shape and seed holds:

- ``hf/``: the transformers checkpoint (``config.json``, bf16 ``model.safetensors``) for the
  transformers and bitsandbytes engines;
- ``model.{F16,Q8_0,Q4_0}.gguf``: the same weights through :func:`qadapt.models.gguf_export.export_gguf`
  (gguf-py's quantizer), and ``model.Q4_K_M.gguf`` from llama.cpp's own quantizer when
  llama-cpp-python is installed;
- ``adapters/a{k}/``: rank-16 LoRA adapters on q, k, v, o in PEFT format, and ``adapters/a{k}.lora.gguf``,
  the same adapter as a llama.cpp LoRA GGUF (its converter's names, metadata and q/k row permutation);
- ``xlora/``: an X-LoRA checkpoint in the reference layout (``xlora_config.json``,
  ``xlora_classifier.safetensors`` with random classifier weights, one sub-folder per expert holding a
  copy of adapter ``a{k}``) over the first :data:`~qadapt.bench.spec.XLORA_EXPERTS` adapters.

Every file is written atomically (``qadapt.io``) and skipped when present, so an interrupted
make resumes; the whole make holds a lock on the folder (:func:`qadapt.cache.file_lock`), so
several processes asking for the same model at once make it once and never read half of it.
The weights are random (seeded): the benchmark measures speed, not text.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..cache import file_lock
from ..errors import UnsupportedError
from ..io import atomic_path, atomic_write, write_json
from .spec import (GGUF_FORMATS, LORA_ALPHA, LORA_RANK, LORA_TARGETS, N_ADAPTERS, XLORA_DEPTH, XLORA_EXPERTS,
                   XLORA_SIZE, ModelShape)

log = logging.getLogger(__name__)

#: Bumped whenever what is made changes, so that stale caches are not reused.
MAKE_VERSION = 1
GGUF_BY_GGUFPY = ("F16", "Q8_0", "Q4_0")


@dataclass(frozen=True)
class BenchFiles:
    folder: Path
    shape: ModelShape
    #: format -> why it could not be made (e.g. Q4_K_M without llama-cpp-python)
    missing: tuple[tuple[str, str], ...] = ()
    #: the dtype the adapter files store their factors in (float32, or bfloat16 / float16 as PEFT saves an
    #: adapter trained in that dtype); llama.cpp's LoRA GGUFs then hold F16 (the same values at these sizes)
    adapter_dtype: str = "float32"

    @property
    def _adapters(self) -> Path:
        return self.folder / ("adapters" if self.adapter_dtype == "float32" else f"adapters-{self.adapter_dtype}")

    @property
    def hf(self) -> Path:
        return self.folder / "hf"

    def gguf(self, fmt: str) -> Path:
        return self.folder / f"model.{fmt}.gguf"

    def adapter(self, k: int) -> Path:
        return self._adapters / f"a{k}"

    def lora_gguf(self, k: int) -> Path:
        return self._adapters / f"a{k}.lora.gguf"

    @property
    def xlora(self) -> Path:
        return self.folder / ("xlora" if self.adapter_dtype == "float32" else f"xlora-{self.adapter_dtype}")

    @property
    def adapter_names(self) -> list[str]:
        return [f"a{k}" for k in range(N_ADAPTERS)]


def bench_folder(cache: Path, shape: ModelShape, seed: int) -> BenchFiles:
    key = json.dumps([MAKE_VERSION, seed, shape.__dict__], sort_keys=True)
    return BenchFiles(Path(cache) / f"{shape.name}-{hashlib.sha256(key.encode()).hexdigest()[:10]}", shape)


def make_bench_files(cache: Path, shape: ModelShape, formats: tuple[str, ...], seed: int = 0,
                     threads: int = 2, xlora: bool = False, adapter_dtype: str = "float32") -> BenchFiles:
    """Make whatever of the model, its formats, the adapters (and the X-LoRA checkpoint) is missing.

    Holds the folder's lock meanwhile: a second process asking for the same folder waits, then
    finds the files made.
    """
    files = replace(bench_folder(cache, shape, seed), adapter_dtype=adapter_dtype)
    with file_lock(Path(cache), files.folder.name):
        return _make(files, formats, seed, threads, xlora)


def _make(files: BenchFiles, formats: tuple[str, ...], seed: int, threads: int, xlora: bool) -> BenchFiles:
    shape = files.shape
    wanted = [f for f in formats if f in GGUF_FORMATS]
    need_hf = any(f in ("bf16", "nf4") for f in formats)
    missing = [f for f in wanted if not files.gguf(f).exists()]
    sd = None
    if missing or (need_hf and not (files.hf / "model.safetensors").exists()):
        t0 = time.perf_counter()
        sd = random_state_dict(shape, seed)
        log.info("made random %s weights (%.2fB parameters) in %.1f s", shape.name, shape.n_params / 1e9,
                 time.perf_counter() - t0)
    if need_hf:
        _write_hf(files, sd)
    for fmt in GGUF_BY_GGUFPY:
        if fmt in wanted or (fmt == "F16" and "Q4_K_M" in missing):
            _write_gguf(files, sd, fmt)
    del sd
    skipped = []
    if "Q4_K_M" in wanted:
        try:
            quantize_llama_cpp(files.gguf("F16"), files.gguf("Q4_K_M"), "Q4_K_M", threads)
        except UnsupportedError as e:
            log.warning("%s", e)
            skipped.append(("Q4_K_M", str(e)))
    for k in range(N_ADAPTERS):
        _write_adapter(files, k, seed)
    if xlora:
        _write_xlora(files, seed)
    return replace(files, missing=tuple(skipped))


def random_state_dict(shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """transformers Llama names, float32; N(0, 0.02) matrices, norms 1 + N(0, 0.1).

    The lm_head row of the EOS token (0) is zero, so greedy decoding of the random model
    (random logits: some are > 0) never picks EOS and every engine decodes the full count.
    """
    cfg = shape.hf_config()
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    kv = h // shape.num_attention_heads * shape.num_key_value_heads
    gen = torch.Generator().manual_seed(seed)

    def mat(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) * 0.02

    def norm() -> torch.Tensor:
        return 1 + torch.randn(h, generator=gen) * 0.1

    sd = {"model.embed_tokens.weight": mat(v, h)}
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        sd.update({
            p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
            p + "self_attn.q_proj.weight": mat(h, h), p + "self_attn.k_proj.weight": mat(kv, h),
            p + "self_attn.v_proj.weight": mat(kv, h), p + "self_attn.o_proj.weight": mat(h, h),
            p + "mlp.gate_proj.weight": mat(i, h), p + "mlp.up_proj.weight": mat(i, h),
            p + "mlp.down_proj.weight": mat(h, i),
        })
    sd["model.norm.weight"] = norm()
    sd["lm_head.weight"] = mat(v, h)
    sd["lm_head.weight"][0] = 0
    return sd


def _write_hf(files: BenchFiles, sd) -> None:
    from safetensors.torch import save_file

    target = files.hf / "model.safetensors"
    if not target.exists():
        with atomic_path(target) as tmp:
            save_file({k: t.to(torch.bfloat16).contiguous() for k, t in sd.items()}, str(tmp),
                      metadata={"format": "pt"})
    if not (files.hf / "config.json").exists():
        write_json(files.hf / "config.json", files.shape.hf_config())


def _write_gguf(files: BenchFiles, sd, fmt: str) -> None:
    from ..models.gguf_export import export_gguf
    from ..layer_maps import get_layer_map

    path = files.gguf(fmt)
    if path.exists():
        return
    t0 = time.perf_counter()
    logging.getLogger("gguf").setLevel(max(logging.WARNING, logging.getLogger("gguf").level))
    export_gguf(sd, files.shape.hf_config(), get_layer_map("llama"), path, fmt,
                tokenizer=tokenizer_metadata(files.shape.vocab_size))
    log.info("wrote %s (%.0f MB) in %.1f s", path.name, path.stat().st_size / 1e6, time.perf_counter() - t0)


def tokenizer_metadata(vocab_size: int) -> dict:
    """A byte-level BPE vocabulary (``gpt2`` model) padded to ``vocab_size``: llama.cpp and qadapt both load it.

    The benchmark feeds token ids; the vocabulary only has to be valid for both loaders.
    """
    from ..tokenizer.llama import BYTE_TO_CHAR

    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [(a, b) for a in letters[:10] for b in letters[:10]]
    tokens = ["<|endoftext|>", "<s>"] + BYTE_TO_CHAR + [a + b for a, b in pairs]
    tokens += [f"<extra_{k}>" for k in range(vocab_size - len(tokens))]
    types = [3, 3] + [1] * (len(tokens) - 2)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in pairs],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
    }


def quantize_llama_cpp(src: Path, dst: Path, qtype: str, threads: int) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``): K-quants that gguf-py cannot write."""
    if dst.exists():
        return
    try:
        import llama_cpp
    except ImportError:
        raise UnsupportedError(f"{dst.name} needs llama.cpp's quantizer: pip install llama-cpp-python") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads
    t0 = time.perf_counter()
    with atomic_path(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise UnsupportedError(f"llama.cpp could not quantize {src} to {qtype} "
                                   f"(llama_model_quantize returned {rc})")
    log.info("quantized %s with llama.cpp in %.1f s", dst.name, time.perf_counter() - t0)


def adapter_factors(shape: ModelShape, k: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT state dict of adapter ``k``: A ~ N(0, 1/in), B ~ N(0, 0.02) (non-zero, so the delta is real)."""
    gen = torch.Generator().manual_seed(10_000 * (seed + 1) + k)
    h = shape.hidden_size
    kv = h // shape.num_attention_heads * shape.num_key_value_heads
    outs = {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h}
    sd = {}
    for L in range(shape.num_hidden_layers):
        for t in LORA_TARGETS:
            p = f"base_model.model.model.layers.{L}.self_attn.{t}"
            sd[p + ".lora_A.weight"] = torch.randn(LORA_RANK, h, generator=gen) / h ** 0.5
            sd[p + ".lora_B.weight"] = torch.randn(outs[t], LORA_RANK, generator=gen) * 0.02
    return sd


def _peft_config(base: Path) -> dict:
    from peft import LoraConfig

    cfg = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                     task_type="CAUSAL_LM").to_dict()
    return {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in cfg.items()}


def _write_adapter(files: BenchFiles, k: int, seed: int) -> None:
    from safetensors.torch import save

    folder = files.adapter(k)
    lora = files.lora_gguf(k)
    weights = folder / "adapter_model.safetensors"
    if weights.exists() and (folder / "adapter_config.json").exists() and lora.exists():
        return
    sd = {n: t.to(getattr(torch, files.adapter_dtype)).contiguous()
          for n, t in adapter_factors(files.shape, k, seed).items()}
    if not (folder / "adapter_config.json").exists():
        write_json(folder / "adapter_config.json", _peft_config(files.hf))
    if not weights.exists():
        atomic_write(weights, save(sd, metadata={"format": "pt"}))
    if not lora.exists():
        write_lora_gguf(sd, files.shape, lora, half=files.adapter_dtype != "float32")


def xlora_names() -> list[str]:
    """The X-LoRA experts: the first adapters, under their own names (the sub-folders)."""
    return [f"a{k}" for k in range(XLORA_EXPERTS)]


def xlora_classifier(shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """Reference-layout classifier tensors: ``inner.0.*`` [XLORA_SIZE, hidden], ``last.*`` [n_layers * experts,
    XLORA_SIZE], float32, random (N(0, 1 / fan_in): scalings spread over the experts, not one-hot).

    n_layers = the modules the experts adapt (layerwise scalings: one row each), as PEFT counts them.
    """
    gen = torch.Generator().manual_seed(20_000 * (seed + 1))
    n_rows = shape.num_hidden_layers * len(LORA_TARGETS) * XLORA_EXPERTS
    dims = [shape.hidden_size] + [XLORA_SIZE] * (XLORA_DEPTH - 1) + [n_rows]
    out = {}
    for i in range(XLORA_DEPTH):
        key = "last" if i == XLORA_DEPTH - 1 else f"inner.{i}"
        out[f"{key}.weight"] = torch.randn(dims[i + 1], dims[i], generator=gen) / dims[i] ** 0.5
        out[f"{key}.bias"] = torch.zeros(dims[i + 1])
    return out


def _write_xlora(files: BenchFiles, seed: int) -> None:
    """The X-LoRA reference layout (what ``qadapt.demo.train.write_xlora`` writes, and mistral.rs reads).

    The config is written last: a folder with it is complete.
    """
    from safetensors.torch import save

    folder = files.xlora
    if (folder / "xlora_config.json").exists():
        return
    names = xlora_names()
    for k, name in enumerate(names):
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            dst = folder / name / f
            if not dst.exists():
                atomic_write(dst, (files.adapter(k) / f).read_bytes())
    atomic_write(folder / "xlora_classifier.safetensors", save(xlora_classifier(files.shape, seed)), force=True)
    write_json(folder / "xlora_config.json", {
        "hidden_size": files.shape.hidden_size, "adapters": {n: n for n in names}, "enable_softmax": True,
        "enable_softmax_topk": False, "softmax_temperature": 1.0, "layerwise_scalings": True, "top_k_lora": None,
        "xlora_depth": XLORA_DEPTH, "xlora_size": XLORA_SIZE, "xlora_dropout_p": 0.0,
        "enable_relu_and_dropout": XLORA_DEPTH > 1, "use_bias": True, "stop_token_id": None,
        "use_trainable_adapters": False, "use_mean_pool": False, "scaling_pass_value": 0.0,
        "global_scaling_weight": 1.0, "base_model_id": files.shape.name,
    })


def write_lora_gguf(peft_sd: dict[str, torch.Tensor], shape: ModelShape | dict, path: Path, arch: str = "llama",
                    half: bool = False) -> Path:
    """A PEFT LoRA as llama.cpp's ``convert_lora_to_gguf.py`` writes it.

    ``general.type=adapter``, ``adapter.type=lora``, ``adapter.lora.alpha``; tensors
    ``blk.N.attn_q.weight.lora_a`` (A, [r, in]) and ``.lora_b`` (B, [out, r]) in F32, with llama.cpp's
    q/k row permutation applied to B's rows (the output features) where the architecture's base weights
    have it (Llama). ``shape``: a :class:`ModelShape` or a transformers config dict of ``arch``. ``half``:
    F16 tensors (``--outtype f16``), else F32.
    """
    import gguf

    from ..models.gguf_export import llama_cpp_permute
    from ..layer_maps import evaluate, get_layer_map

    lm = get_layer_map(arch)
    cfg = shape if isinstance(shape, dict) else shape.hf_config()
    shapes = lm.normalise_hf_config(cfg)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(path=tmp, arch=arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(LORA_ALPHA))
        for ls in lm.layers:
            for i in range(cfg["num_hidden_layers"]) if ls.per_block else [None]:
                key = "base_model.model." + ls.module_path(i)
                if key + ".lora_A.weight" not in peft_sd:
                    continue
                a = peft_sd[key + ".lora_A.weight"].float().numpy()
                b = peft_sd[key + ".lora_B.weight"].float().numpy()
                if ls.gguf_permute_heads:
                    b = llama_cpp_permute(b, evaluate(ls.gguf_permute_heads, shapes))
                name = ls.gguf_name(i) + ".weight"
                dt = np.float16 if half else np.float32
                w.add_tensor(name + ".lora_a", np.ascontiguousarray(a, dtype=dt))
                w.add_tensor(name + ".lora_b", np.ascontiguousarray(b, dtype=dt))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def gguf_bytes_per_token(path: Path) -> dict[str, int]:
    """Bytes a decode step reads from a GGUF: every tensor but the embedding table, of which one row.

    (KV-cache reads, small at these lengths, are not counted.)
    """
    from ..formats.gguf import GGUFFile

    gf = GGUFFile(path)
    total, embed_row, embed_all = 0, 0, 0
    for t in gf.tensors.values():
        if t.name == "token_embd.weight":
            embed_all = t.nbytes
            embed_row = t.nbytes // t.shape[0] if t.shape else t.nbytes
        else:
            total += t.nbytes
    return {"weights_bytes": total + embed_all, "bytes_per_token": total + embed_row}
