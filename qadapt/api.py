"""The Python API: ``qadapt.load(...)`` returns a :class:`Model`.

Everything the CLI and the server do goes through here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import InputError, SourceError
from .layer_maps import LayerMap, get_layer_map
from .models.config import ModelConfig
from .models.decoder import Decoder
from .runtime.generate import Generation, SamplingParams, run_generation
from .runtime.kv_cache import KVCache
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

MODES = ("inplace", "dequantize")


class Model:
    """A loaded base model (and, once loaded, its adapters)."""

    def __init__(self, decoder: Decoder, tokenizer: Tokenizer | None, layer_map: LayerMap, source: str,
                 mode: str, base_format: str, file_info: dict[str, Any] | None = None):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.layer_map = layer_map
        self.source = source
        self.mode = mode
        self.base_format = base_format  # "gguf" | "full" | "gptq" | "bnb"
        self.file_info = file_info or {}

    @property
    def config(self) -> ModelConfig:
        return self.decoder.cfg

    @property
    def architecture(self) -> str:
        return self.layer_map.architecture

    # ------------------------------------------------------------------ forward
    def _context(self) -> Any:
        """Per-forward adapter context (None: base model only)."""
        return None

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without cache: LongTensor [batch, seq] -> float32 [batch, seq, vocab]."""
        ids = self._check_ids(input_ids)
        return self.decoder(ids, ctx=self._context()).logits

    def _check_ids(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        if ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise InputError(f"token ids must be in [0, {self.config.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        if ids.shape[1] > self.config.context_length:
            raise InputError(f"{ids.shape[1]} tokens exceed the context length {self.config.context_length}")
        return ids

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim)

    @torch.inference_mode()
    def _step(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        return self.decoder(ids, positions, cache, ctx=self._context(), last_only=True).logits[:, -1]

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: list[str] | tuple[str, ...] = (),
        stream: bool = False,
    ) -> Generation | Iterator[str]:
        """Generate from a text or token-id prompt; greedy unless ``temperature > 0``.

        Returns a :class:`Generation` (``.text``, ``.token_ids`` of the new tokens), or an
        iterator of text pieces when ``stream=True``.
        """
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InputError(f"{self.source} has no tokenizer; pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            self._check_ids(torch.tensor(ids))
        params = SamplingParams(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, tuple(stop))
        tok = self.tokenizer or _IdTokenizer(self.config.eos_token_ids)
        return run_generation(self._step, self.new_cache, ids, params, tok, self.config.context_length, stream)

    # ------------------------------------------------------------------ introspection
    def targetable_layers(self) -> list[str]:
        return [r.path for r in self.layer_map.enumerate_modules(self.config.num_hidden_layers)]

    def memory_bytes(self) -> int:
        from .models.build import model_bytes

        return model_bytes(self.decoder)

    def __repr__(self) -> str:
        return f"Model({self.architecture}, {self.source}, mode={self.mode}, format={self.base_format})"


class _IdTokenizer:
    """Stand-in when a model has no tokenizer: ids in, empty text out."""

    def __init__(self, eos):
        self.eos_ids = tuple(eos)

    def decode(self, ids, skip_special=True):
        return ""


def _resolve_model_path(path_or_id: str | os.PathLike, gguf_file: str | None, revision: str | None) -> Path:
    p = Path(path_or_id)
    if p.exists():
        if p.is_dir() and gguf_file:
            p = p / gguf_file
        return p
    s = str(path_or_id)
    if gguf_file is None:
        if s.count("/") == 1 and not s.startswith((".", "/")):
            raise InputError(
                f"{s} is not a local file; for a GGUF model on the Hub pass the file name too "
                f"(--gguf-file NAME / gguf_file=NAME)"
            )
        raise InputError(f"model {s} does not exist")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(hf_hub_download(s, gguf_file, revision=revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise SourceError(f"{s}/{gguf_file} is not in the local Hugging Face cache and the Hub cannot be "
                          f"reached (offline mode or no network): {e}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SourceError(f"cannot download {gguf_file} from {s}: {e}") from None


def load(
    path_or_id: str | os.PathLike,
    *,
    mode: str = "inplace",
    dtype: torch.dtype | str | None = None,
    gguf_file: str | None = None,
    revision: str | None = None,
    **kwargs: Any,
) -> Model:
    """Load a base model: a GGUF file (local, or ``org/repo`` + ``gguf_file`` on the Hub).

    ``mode="inplace"`` keeps quantized weights in their bytes and multiplies on them;
    ``mode="dequantize"`` expands them to ``dtype`` (float32 by default) on load.
    """
    from .formats.gguf import GGUFFile, is_gguf
    from .models.build import GGUFSource, build_decoder
    from .models.config import config_from_gguf
    from .models.family import FAMILIES

    if kwargs:
        raise InputError(f"unknown argument(s) to qadapt.load: {', '.join(sorted(kwargs))}")
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    dt = _dtype(dtype)
    path = _resolve_model_path(path_or_id, gguf_file, revision)
    if path.is_dir():
        raise InputError(f"{path} is a folder; transformers checkpoints are not supported yet, pass a .gguf file")
    if not is_gguf(path):
        from .formats.gguf import GGUFFile as _G

        _G(path)  # raises the precise error (empty, not GGUF)
    gf = GGUFFile(path)
    lm = get_layer_map(gf.architecture)
    cfg = config_from_gguf(gf, lm)
    tok = Tokenizer.from_gguf(gf) if "tokenizer.ggml.tokens" in gf.metadata else None
    if tok is not None:
        cfg = _with_tokens(cfg, tok)
    decoder = build_decoder(cfg, lm, FAMILIES[lm.architecture], GGUFSource(gf, mode, dt), desc=f"loading {path.name}")
    decoder.eval()
    info = {"file_size": gf.file_size, "types": gf.type_counts(), "path": str(path)}
    return Model(decoder, tok, lm, str(path), mode, "gguf", info)


def _with_tokens(cfg: ModelConfig, tok: Tokenizer) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, bos_token_id=tok.bos_id, eos_token_ids=tok.eos_ids or cfg.eos_token_ids)


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "f32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "f16": torch.float16, "fp16": torch.float16}
    try:
        return table[str(dtype).lower()]
    except KeyError:
        raise InputError(f"dtype must be one of {sorted(table)}, got {dtype!r}") from None
