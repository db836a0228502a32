"""X-LoRA: several LoRA experts mixed per token (and per layer) by a small classifier (its checkpoints:
:mod:`qadapt.adapters.xlora_checkpoint`).

The forward is PEFT's (``peft/tuners/xlora``): a scaling pass with every adapter
scaled by ``scaling_pass_value`` gives the final-norm hidden states, the classifier
(float32 whatever the base) turns them into scalings ``[batch, seq, n_layers or 1,
n_adapters]``, and the real pass adds ``B_i(A_i(x * s_i)) * scale_i * global`` in
each wrapped module. The scalings reach the LoRA wrappers as an argument (the
:class:`XLoraScalings` in :class:`~qadapt.adapters.lora.AdapterContext`), never as
hooks. During generation the two passes keep separate KV caches
(:class:`XLoraCache`), and non-granular scalings are frozen per sequence row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import AdapterError, UnsupportedError
from .lora import wide
from .xlora_checkpoint import (XLoraCheckpoint, XLoraClassifier, XLoraConfig, classifier_rows, ordering_problems,
                               read_xlora, wrapped_modules)

log = logging.getLogger(__name__)


def select_top_k(scalings: torch.Tensor, config: XLoraConfig) -> torch.Tensor:
    """PEFT's ``get_maybe_topk_scalings`` over the last dim: keep the k largest, optionally softmax them."""
    s = scalings
    if config.top_k_lora is not None:
        idx = torch.topk(s, k=config.top_k_lora, dim=-1).indices
        mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
        s = s * mask.to(s.dtype)
    if config.enable_softmax_topk:
        nonzero = s != 0
        s = torch.softmax(s.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return s


# ---------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class XLoraScalings:
    """What ``LoraLinear.forward`` receives: per-token scalings (top-k applied) and each module's row."""

    scalings: torch.Tensor  # [B, T, n_layers or 1, n_adapters], float32
    rows: dict[str, int]
    order: tuple[str, ...]
    global_weight: float

    def native_entries(self, layer, m: int) -> list[tuple] | None:
        """This layer's expert deltas for a decode step of ``m`` rows (one token each) as native LoRA entries
        (row, A, Bt, scale): each expert's scale times its scaling for that row and layer (what :meth:`apply`
        computes, in the fused decode's one call); None where the native kernel cannot take them."""
        row = self.rows.get(layer.path)
        if row is None:
            return []
        s = self.scalings[:, :, row if self.scalings.shape[2] > 1 else 0]  # [B, T, C]
        if s.shape[0] * s.shape[1] != m or s.shape[1] != 1:
            return None
        names = [(i, n) for i, n in enumerate(self.order) if n in layer.adapters]
        if not all(layer._fits_native(n) for _, n in names):
            return None
        s = s[:, 0].tolist()
        return [(b, layer.adapters[n].A, layer._bt[n], s[b][i] * layer.adapters[n].scale * self.global_weight)
                for b in range(m) for i, n in names]

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        row = self.rows.get(layer.path)
        if row is None:
            return y
        s = self.scalings[:, :, row if self.scalings.shape[2] > 1 else 0]  # [B, T, C]
        for i, name in enumerate(self.order):
            f = layer.adapters.get(name)
            if f is None:
                continue
            A, B = wide(f.A), wide(f.B)
            xs = x.to(A.dtype) * s[..., i : i + 1].to(A.dtype)
            y = y + ((xs @ A.T) @ B.T * (f.scale * self.global_weight)).to(y.dtype)
        return y


@dataclass
class RowState:
    """Non-granular scalings of one sequence row: decode steps seen, and the frozen scalings once fixed."""

    decoded: int = 0
    frozen: torch.Tensor | None = None  # [1, n_layers or 1, n_adapters]


class XLoraCache:
    """The real pass's and the scaling pass's KV caches, plus each row's non-granular state."""

    def __init__(self, real, scaling):
        self.real, self.scaling = real, scaling
        self.rows = [RowState() for _ in range(real.batch)]

    @property
    def max_len(self) -> int:
        return self.real.max_len

    @property
    def batch(self) -> int:
        return self.real.batch

    @property
    def nbytes(self) -> int:
        return self.real.nbytes + self.scaling.nbytes

    def reset_rows(self, rows: list[int]) -> None:
        self.real.reset_rows(rows)
        self.scaling.reset_rows(rows)
        for r in rows:
            self.rows[r] = RowState()


class XLora:
    """A loaded X-LoRA: classifier, adapter order, each module's classifier row, non-granular target."""

    def __init__(self, checkpoint: XLoraCheckpoint, classifier: XLoraClassifier, rows: dict[str, int],
                 tgt_non_granular_index: int | None = None):
        self.checkpoint, self.config, self.classifier = checkpoint, checkpoint.config, classifier
        self.order = checkpoint.config.adapters
        self.rows = rows
        self.tgt_non_granular_index = tgt_non_granular_index
        self.last_scalings: torch.Tensor | None = None
        self.scaling_passes = 0  # forwards of the scaling pass run (for benchmarks)

    @property
    def n_layers(self) -> int:
        return len(self.rows)

    def _context(self, scalings: torch.Tensor):
        from .lora import AdapterContext

        s = XLoraScalings(select_top_k(scalings, self.config), self.rows, self.order,
                          self.config.global_scaling_weight)
        return AdapterContext(active=self.order, xlora=s)

    def scaling_pass_context(self, batch: int, seq: int, device: torch.device | str = "cpu"):
        """Every adapter at ``scaling_pass_value`` (None when it is 0: then the pass is the base model, exactly)."""
        spv = self.config.scaling_pass_value
        if spv == 0:
            return None
        return self._context(torch.full((batch, seq, 1, self.config.n_classes), float(spv), device=device))

    def context(self, decoder, ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: XLoraCache | None = None):
        """Run the scaling pass (on ``cache.scaling``) and the classifier; the real pass's AdapterContext."""
        B, T = ids.shape
        states = cache.rows if cache is not None else None
        if states is not None and T == 1:
            for st in states:
                if st.frozen is None:
                    st.decoded += 1
        if states is None or any(st.frozen is None for st in states):
            hidden = decoder(ids, positions, None if cache is None else cache.scaling,
                             ctx=self.scaling_pass_context(B, T, ids.device), logits=False).hidden
            self.scaling_passes += 1
            scalings = self.classifier(hidden)
        else:
            scalings = torch.empty(B, T, self.classifier.out_layers, self.config.n_classes, device=ids.device)
        if states is not None:
            self._non_granular(states, scalings)
        self.last_scalings = scalings
        return self._context(scalings)

    def _non_granular(self, states: list[RowState], scalings: torch.Tensor) -> None:
        k = self.tgt_non_granular_index
        for b, st in enumerate(states):
            if st.frozen is not None:
                scalings[b] = st.frozen.expand(scalings.shape[1], -1, -1)
            elif k is not None and st.decoded == k:
                st.frozen = scalings[b, -1:].clone()
                log.debug("row %d: X-LoRA scalings frozen after %d generated token(s)", b, k)


# ---------------------------------------------------------------------- loading into a model
def load_xlora(model, source: str, ordering=None, tgt_non_granular_index: int | None = None,
               adapter_model_id: str | None = None, revision: str | None = None) -> XLora:
    """Resolve and check an X-LoRA checkpoint against ``model`` and an optional ordering; load its adapters."""
    from .sources import resolve_adapter

    if tgt_non_granular_index is not None and (isinstance(tgt_non_granular_index, bool)
                                               or not isinstance(tgt_non_granular_index, int)
                                               or tgt_non_granular_index < 0):
        raise AdapterError(f"tgt_non_granular_index must be a non-negative integer, got {tgt_non_granular_index!r}")
    folder = resolve_adapter(str(source), revision=revision)
    ckpt = read_xlora(folder)
    cfg = ckpt.config
    if cfg.hidden_size != model.config.hidden_size:
        raise AdapterError(f"X-LoRA {source}: hidden_size {cfg.hidden_size} in {cfg.source}, the base has "
                           f"{model.config.hidden_size}")
    root = resolve_adapter(adapter_model_id) if adapter_model_id else folder
    folders = {n: ckpt.adapter_folder(n, root) for n in cfg.adapters}
    wrapped = wrapped_modules(ckpt, folders)
    order = ordering.order if ordering is not None else None
    layers = ordering.layers if ordering is not None else None
    problems = ordering_problems(ckpt, order, layers, wrapped, model.layer_map)
    if problems:
        where = f" with ordering {ordering.source}" if ordering is not None else ""
        raise AdapterError(f"X-LoRA {source}{where}:\n  - " + "\n  - ".join(m for _, m in problems))
    rows = classifier_rows(wrapped, layers, model.layer_map, model.config.num_hidden_layers)
    classifier = ckpt.load_classifier(len(rows))
    for name in cfg.adapters:
        model.load_adapter(name, str(folders[name]))
    log.info("X-LoRA %s (%s layout): %d adapters, %d layers, depth %d%s", source, cfg.layout, cfg.n_classes,
             len(rows), cfg.xlora_depth, ", layerwise" if cfg.layerwise_scalings else "")
    return XLora(ckpt, classifier, rows, tgt_non_granular_index)


def unsupported_with_xlora(what: str) -> UnsupportedError:
    return UnsupportedError(f"{what} cannot be combined with X-LoRA (its classifier decides the adapters' weights)")

