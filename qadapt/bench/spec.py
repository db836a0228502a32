"""What is benchmarked: the model shapes, the engines and formats, and the run settings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class ModelShape:
    """A random Llama-architecture model (transformers ``LlamaConfig`` fields)."""

    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 2048

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
            "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 0, "torch_dtype": "bfloat16",
        }

    @property
    def n_params(self) -> int:
        h, i, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.hidden_size // self.num_attention_heads * self.num_key_value_heads
        return 2 * v * h + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


#: The issue's model: ~0.84B parameters.
FULL = ModelShape("llama-0.8b", 2048, 16, 5632, 32000, 32, 4)
#: ``--quick``: same architecture, small enough for a CI smoke run (~13M parameters).
QUICK = ModelShape("llama-quick", 256, 4, 768, 4096, 8, 2)

#: GGUF formats: made with gguf-py, except Q4_K_M (llama.cpp's own quantizer).
GGUF_FORMATS = ("F16", "Q8_0", "Q4_0", "Q4_K_M")
#: engine -> the formats it runs (GGUF formats, or the transformers checkpoint as bf16 / nf4).
ENGINES = {
    "qadapt": GGUF_FORMATS,
    "llama.cpp": GGUF_FORMATS,
    "transformers": ("bf16",),
    "bnb": ("nf4",),
}
#: ``q8``: in place with ``kernels="q8"`` (llama.cpp's arithmetic)
QADAPT_MODES = ("inplace", "q8", "dequantize")
#: the files ``--out`` receives (see :mod:`.report`)
OUTPUTS = ("bench.json", "bench.md", "bench.png", "bench-summary.md")
#: Which formats share a group of workers (alive together, runs interleaved): peers of similar size.
GROUP_OF = {"F16": "F16", "bf16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "nf4": "Q4_0", "Q4_K_M": "Q4_K_M"}
N_ADAPTERS = 8
LORA_RANK = 16
LORA_ALPHA = 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: X-LoRA checkpoint over the first adapters: classifier as the X-LoRA paper's models have it (layerwise
#: scalings, one hidden layer of XLORA_SIZE), so a scaling step costs what it costs there
XLORA_EXPERTS = 4
XLORA_DEPTH = 2
XLORA_SIZE = 2048
#: ``tgt_non_granular_index`` of the non-granular run: scalings fixed from the prompt, decode skips the scaling pass
XLORA_NON_GRANULAR_INDEX = 0


@dataclass(frozen=True)
class Job:
    """One engine on one format (and mode, for qadapt): one worker process."""

    engine: str
    format: str
    mode: str = ""
    #: "" (the LoRA metrics) or "xlora" (qadapt with the X-LoRA checkpoint, in its own worker: its
    #: model carries the classifier and every expert, so it is not the LoRA worker's model)
    task: str = ""

    @property
    def label(self) -> str:
        parts = [self.engine] + [p for p in (self.mode, self.task) if p]
        return f"{'-'.join(parts)} {self.format}"

    def to_json(self) -> dict:
        return {"engine": self.engine, "format": self.format, "mode": self.mode}


def default_cache() -> Path:
    base = os.environ.get("QADAPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qadapt")
    return Path(base) / "bench"


@dataclass(frozen=True)
class BenchSettings:
    """A benchmark run. ``runs`` measured runs follow ``warmup`` discarded ones, per metric."""

    out: Path | None = None
    cache: Path = field(default_factory=default_cache)
    quick: bool = False
    engines: tuple[str, ...] = tuple(ENGINES)
    formats: tuple[str, ...] = GGUF_FORMATS + ("bf16", "nf4")
    modes: tuple[str, ...] = QADAPT_MODES
    #: formats qadapt's ``dequantize`` mode runs on (None: all); it expands every file to the same
    #: float32 model, so one format shows it at a fraction of the time
    dequantize_formats: tuple[str, ...] | None = None
    runs: int = 5
    warmup: int = 1
    threads: int = 2
    prompt_tokens: int = 128
    decode_tokens: int = 64
    batch: int = N_ADAPTERS
    batch_prompt_tokens: int = 16
    #: time qadapt's X-LoRA decode (granular and non-granular), in place, on ``xlora_formats`` (None: all selected)
    xlora: bool = True
    xlora_formats: tuple[str, ...] | None = None
    #: bandwidth probe: array size (well above the last-level cache) and passes (the best one counts)
    probe_gib: float = 1.0
    probe_repeats: int = 7
    force: bool = False
    seed: int = 0
    #: the dtype the adapter files store their factors in (``float32``, ``bfloat16``, ``float16``)
    adapter_dtype: str = "float32"
    #: another shape than FULL / QUICK (tests: a model small enough to make and run in seconds)
    model: ModelShape | None = None

    @property
    def shape(self) -> ModelShape:
        if self.model is not None:
            return self.model
        return QUICK if self.quick else FULL

    def validate(self) -> "BenchSettings":
        bad = [e for e in self.engines if e not in ENGINES]
        if bad:
            raise InputError(f"unknown engine(s) {', '.join(bad)}; choose from {', '.join(ENGINES)}")
        known = set(GGUF_FORMATS) | {"bf16", "nf4"}
        bad = [f for f in self.formats if f not in known]
        if bad:
            raise InputError(f"unknown format(s) {', '.join(bad)}; choose from {', '.join(sorted(known))}")
        bad = [m for m in self.modes if m not in QADAPT_MODES]
        if bad:
            raise InputError(f"unknown qadapt mode(s) {', '.join(bad)}; choose from {', '.join(QADAPT_MODES)}")
        if self.runs < 1 or self.warmup < 0:
            raise InputError(f"--runs must be >= 1 and --warmup >= 0, got {self.runs} and {self.warmup}")
        if not 1 <= self.batch <= N_ADAPTERS:
            raise InputError(f"--batch must be in 1..{N_ADAPTERS} (one adapter per row), got {self.batch}")
        if self.out is not None and not self.force:
            taken = [n for n in OUTPUTS if (Path(self.out) / n).exists()]
            if taken:
                raise InputError(f"{self.out} already holds {', '.join(taken)}; pass --force to overwrite")
        return self

    def jobs(self) -> list[Job]:
        out = []
        for engine in self.engines:
            for fmt in ENGINES[engine]:
                if fmt not in self.formats:
                    continue
                if engine == "qadapt":
                    out.extend(Job(engine, fmt, m) for m in self.modes
                               if m != "dequantize" or self.dequantize_formats is None
                               or fmt in self.dequantize_formats)
                    if self.xlora and (self.xlora_formats is None or fmt in self.xlora_formats):
                        out.extend(Job(engine, fmt, m, "xlora") for m in ("inplace", "q8") if m in self.modes)
                else:
                    out.append(Job(engine, fmt))
        return out
