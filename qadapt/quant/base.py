"""The one contract every base-model linear layer meets, quantized or not.

Model, adapter and cache code only ever use what is declared here: the sizes,
``forward(x)``, ``dequantize()`` and ``nbytes``. How a format stores its weights
and which kernel runs its matmul stays inside that format's module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class X8Weight:
    """A weight in the native q8 kernels' 8-row interleaved layout (``kernels="q8"``): what the fused decode
    (:mod:`qadapt.models.native`) multiplies without going through the layer."""

    qtype: str
    layout: torch.Tensor  # uint8, the repacked blocks
    out_features: int


class BaseLinear(nn.Module):
    """A linear map ``y = x @ W.T + b`` with ``W`` of shape [out_features, in_features].

    Subclasses set ``in_features``, ``out_features``, ``qtype`` (e.g. ``"Q4_K"``,
    ``"F32"``, ``"gptq-4bit"``) and an optional float32 ``bias``, and implement
    :meth:`dequantize` and :meth:`forward`.
    """

    in_features: int
    out_features: int
    qtype: str
    bias: torch.Tensor | None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out_features, in_features]: the reference the forward must agree with."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """x [..., in_features] -> [..., out_features], returned in x's dtype."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes the weight (and bias) occupy in memory."""
        raise NotImplementedError

    @property
    def weight_is_dense(self) -> bool:
        """True when the layer holds a dense float copy of its weight."""
        return False

    def x8_weight(self) -> X8Weight | None:
        """The weight in the native 8-row layout when the layer keeps it (q8 kernels, no bias), else None."""
        return None

    def q8_kernels(self):
        """The native kernels this layer computes with on the q8 path (its decode steps are native calls), or None."""
        return None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, qtype={self.qtype}, bytes={self.nbytes}"


class DenseLinear(BaseLinear):
    """A plain dense weight: dequantize mode, and full-precision checkpoints."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, qtype: str = "F32"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qtype = qtype
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(weight.dtype), requires_grad=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        y = torch.nn.functional.linear(x.to(w.dtype), w, self.bias)
        return y.to(x.dtype)

    @property
    def nbytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    @property
    def weight_is_dense(self) -> bool:
        return True
