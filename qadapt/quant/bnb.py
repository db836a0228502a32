"""bitsandbytes linears: NF4 / FP4 (``Linear4bit``) and LLM.int8() (``Linear8bitLt``).

The layer wraps bitsandbytes' own module, so its forward is bitsandbytes' forward (the
same as a transformers model loaded with ``BitsAndBytesConfig``): on a CPU with AVX512-BF16
bitsandbytes repacks a 4-bit weight for its CPU kernel on the first inference call
(absmax in bf16), which :class:`BnbLinear` triggers once at construction so the layer's
bytes do not change under the caller. ``dequantize()`` always returns bitsandbytes'
``dequantize_4bit`` / ``int8_vectorwise_dequant`` of the weight as quantized (the
checkpoint's values), kept exact across that repacking.

On the device path (``device="cuda"``, or ``kernels="triton"`` on CPU) :meth:`BnbLinear.use_triton` takes
the stored weight out of bitsandbytes' module (4-bit codes in the original layout with their absmax as
stored, nested included; int8 ``CB`` / ``SCB``) and multiplies with :mod:`.triton.bnb` on it: bitsandbytes'
dequantized weight with float activations (for int8 not LLM.int8()'s int8 arithmetic, which approximates it).

bitsandbytes is imported lazily: ``import qadapt`` works without it, and
:func:`require_bnb` turns a missing or unusable install into an :class:`UnsupportedError`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from ..errors import FormatError, UnsupportedError
from . import kernels
from .base import BaseLinear, DenseLinear

log = logging.getLogger(__name__)

#: bitsandbytes quant types qadapt runs, as their ``qtype`` names.
BNB_QTYPES = ("nf4", "fp4", "int8")
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def require_bnb():
    """The ``bitsandbytes`` module, or an :class:`UnsupportedError` saying why it cannot be used."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (fails on installs without a usable backend)
    except ImportError as e:
        raise UnsupportedError(
            f"bitsandbytes bases need the `bitsandbytes` package ({e}); install it with "
            "`pip install 'qadapt[bnb]'`"
        ) from None
    except Exception as e:  # a broken native library raises RuntimeError/OSError at import
        raise UnsupportedError(f"bitsandbytes is installed but cannot run on this machine: {e}") from None
    return bitsandbytes


def _tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class BnbLinear(BaseLinear):
    """A bitsandbytes-quantized linear; build it with :meth:`quantize`, :meth:`from_4bit` or :meth:`from_int8`."""

    def __init__(self, inner: torch.nn.Module, qtype: str, in_features: int, out_features: int,
                 compute_dtype: torch.dtype, name: str = ""):
        super().__init__()
        self.inner = inner.eval()
        self.qtype, self.in_features, self.out_features = qtype, in_features, out_features
        self.compute_dtype = compute_dtype
        self.name = name
        self.path = "bnb"  # bitsandbytes' own forward; "triton" after use_triton()
        self._state4 = None
        if qtype != "int8":
            self._state4 = copy.copy(inner.weight.quant_state)  # the checkpoint's state, before any repacking
            with torch.inference_mode():
                inner(torch.zeros(1, in_features, dtype=compute_dtype))  # bitsandbytes' one-time CPU repack
        else:
            with torch.inference_mode():
                inner(torch.zeros(1, in_features, dtype=compute_dtype))  # moves CB/SCB into the matmul state

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        b = self.inner.bias
        return None if b is None else b.detach().float()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, quant: str = "nf4", *,
                 double_quant: bool = False, compute_dtype: torch.dtype = torch.float32, blocksize: int = 64,
                 threshold: float = 6.0, name: str = "") -> "BnbLinear":
        """Quantize a dense weight [out, in] with bitsandbytes, as ``BitsAndBytesConfig`` would.

        ``weight`` is quantized in its own dtype (transformers quantizes the checkpoint's
        dtype); ``threshold`` is LLM.int8()'s outlier threshold (``llm_int8_threshold``).
        """
        bnb = require_bnb()
        _check_quant(quant, compute_dtype)
        out_f, in_f = weight.shape
        if quant != "int8" and (in_f % blocksize or out_f % 32):
            raise UnsupportedError(f"{name or 'a linear'} is {out_f} x {in_f}: bitsandbytes' 4-bit CPU kernel needs "
                                   f"input features in whole {blocksize}-value blocks and output features in "
                                   "multiples of 32 (use int8, or a GGUF type)")
        with torch.no_grad():
            if quant == "int8":
                inner = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                            threshold=threshold, device="meta")
                inner.weight = bnb.nn.Int8Params(weight.detach().contiguous(), requires_grad=False,
                                                 has_fp16_weights=False).to("cpu")
            else:
                inner = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                                          compress_statistics=double_quant, quant_type=quant, device="meta")
                inner.weight = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False,
                                                 quant_type=quant, blocksize=blocksize,
                                                 compress_statistics=double_quant, module=inner).to("cpu")
            if bias is not None:
                inner.bias = torch.nn.Parameter(bias.detach().to(compute_dtype if quant != "int8" else weight.dtype),
                                                requires_grad=False)
        return cls(inner, quant, in_f, out_f, compute_dtype, name)

    @classmethod
    def from_4bit(cls, packed: torch.Tensor, quant_state: dict[str, torch.Tensor], bias: torch.Tensor | None = None,
                  *, compute_dtype: torch.dtype = torch.float32, name: str = "") -> "BnbLinear":
        """A pre-quantized 4-bit weight as transformers saves it: the packed ``weight`` and its
        ``absmax``, ``quant_map``, optional ``nested_absmax`` / ``nested_quant_map`` and the
        ``quant_state.bitsandbytes__<type>`` entry (names relative to ``<module>.weight.``)."""
        bnb = require_bnb()
        try:
            qs = bnb.functional.QuantState.from_dict(dict(quant_state), device=torch.device("cpu"))
        except Exception as e:  # bitsandbytes raises ValueError/KeyError/JSON errors on bad states
            raise FormatError(f"{name}: cannot read the bitsandbytes quant_state ({e})") from None
        qtype = qs.quant_type
        _check_quant(qtype, compute_dtype)
        out_f, in_f = (int(d) for d in qs.shape)
        if packed.numel() * packed.element_size() * 2 != out_f * in_f:
            raise FormatError(f"{name}: packed 4-bit weight has {packed.numel() * packed.element_size()} bytes; "
                              f"its quant_state shape {list(qs.shape)} needs {out_f * in_f // 2}")
        with torch.no_grad():
            inner = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                                      quant_type=qtype, device="meta")
            inner.weight = bnb.nn.Params4bit.from_prequantized(packed, dict(quant_state), requires_grad=False,
                                                               device="cpu", module=inner)
            if bias is not None:
                inner.bias = torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        return cls(inner, qtype, in_f, out_f, compute_dtype, name)

    @classmethod
    def from_int8(cls, weight: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None, *,
                  threshold: float = 6.0, compute_dtype: torch.dtype = torch.float32, name: str = "") -> "BnbLinear":
        """A pre-quantized LLM.int8() weight: int8 ``weight`` [out, in] and its per-row ``SCB``."""
        bnb = require_bnb()
        if weight.dtype != torch.int8 or weight.ndim != 2:
            raise FormatError(f"{name}: an 8-bit bitsandbytes weight must be 2-D int8, got {weight.dtype} "
                              f"{list(weight.shape)}")
        out_f, in_f = weight.shape
        if scb.numel() != out_f:
            raise FormatError(f"{name}: `SCB` has {scb.numel()} values, expected one per output row ({out_f})")
        with torch.no_grad():
            inner = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                        threshold=threshold, device="meta")
            inner.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False,
                                             CB=weight.contiguous(), SCB=scb.float().reshape(-1))
            if bias is not None:
                inner.bias = torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
        return cls(inner, "int8", in_f, out_f, compute_dtype, name)

    # ------------------------------------------------------------------ contract
    def _int8_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.path == "triton":
            return self.cb, self.scb
        st = self.inner.state
        cb = st.CB if st.CB is not None else self.inner.weight.data
        scb = st.SCB if st.SCB is not None else self.inner.weight.SCB
        return cb, scb

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """bitsandbytes' dequantization of the weight as quantized (``dequantize_4bit`` /
        ``int8_vectorwise_dequant``), float32 then cast to ``dtype``."""
        import bitsandbytes.functional as F

        if self.qtype == "int8":
            cb, scb = self._int8_parts()
            return F.int8_vectorwise_dequant(cb, scb).float().to(dtype)
        if self.path == "triton":
            return F.dequantize_4bit(self.codes, self._quant_state()).float().reshape(
                self.out_features, self.in_features).to(dtype)
        w = self.inner.weight
        packed = w.data
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            # undo the CPU kernel's weight layout (a bit permutation, exact); its state copy is discarded
            packed, _ = F._convert_weight_packed_for_cpu_inverse(packed, copy.copy(w.quant_state))
        return F.dequantize_4bit(packed, self._state4).float().reshape(self.out_features, self.in_features).to(dtype)

    def _quant_state(self):
        """bitsandbytes' QuantState of the weight whose tensors are this layer's buffers (on the device path,
        wherever ``.to()`` moved them)."""
        st = copy.copy(self._state4)
        st.absmax, st.code = self.absmax, self.code
        if st.nested:
            st.offset, st.state2 = self.offset, copy.copy(st.state2)
            st.state2.absmax, st.state2.code = self.absmax2, self.code2
        return st

    def _kernel(self, x: torch.Tensor) -> str:
        """Which kernel multiplies a 4-bit weight on the device path: bitsandbytes' own (its CUDA GEMV and
        dequantize kernels, as a transformers bnb model runs them) on a GPU, the Triton kernel elsewhere;
        ``QADAPT_BNB_KERNEL=triton|bnb`` chooses (gpu_check measures both)."""
        import os

        want = os.environ.get("QADAPT_BNB_KERNEL", "")
        if want in ("triton", "bnb"):
            return want
        if want:
            raise UnsupportedError(f"QADAPT_BNB_KERNEL={want!r}: use 'bnb' or 'triton'")
        return "bnb" if x.device.type == "cuda" and not _BNB_CUDA_FAILED else "triton"

    def use_triton(self) -> None:
        """Multiply with the Triton kernel (:mod:`.triton.bnb`, on a GPU or the CPU interpreter) on the weight
        as stored: 4-bit codes in bitsandbytes' original layout (its CPU repack undone) with their absmax as the
        checkpoint holds it (nested stays nested), or int8 ``CB`` / ``SCB``. They become the layer's buffers
        (``.to()`` moves them); bitsandbytes' module keeps only the bias."""
        if self.path == "triton":
            return
        import bitsandbytes.functional as F

        if self.qtype == "int8":
            cb, scb = self._int8_parts()
            self.register_buffer("cb", cb.contiguous())
            self.register_buffer("scb", scb.float().reshape(-1).contiguous())
            self.inner.state.CB = self.inner.state.SCB = None
        else:
            w, st = self.inner.weight, self._state4
            dtypes = {st.state2.dtype, st.state2.absmax.dtype} if st.nested else {st.absmax.dtype}
            if dtypes != {torch.float32}:
                raise UnsupportedError(f"{self.name}: a bitsandbytes absmax in {dtypes} is not supported on the "
                                       "device kernels (float32 only); load with mode='dequantize'")
            packed = w.data
            if getattr(w.quant_state, "packing_format_for_cpu", False):
                packed, _ = F._convert_weight_packed_for_cpu_inverse(packed, copy.copy(w.quant_state))
            self.register_buffer("codes", packed.contiguous().view(torch.uint8).reshape(-1))
            self.register_buffer("absmax", st.absmax.reshape(-1))
            self.register_buffer("code", st.code.float())
            self.register_buffer("absmax2", st.state2.absmax.reshape(-1) if st.nested else None)
            self.register_buffer("code2", st.state2.code.float() if st.nested else None)
            self.register_buffer("offset", torch.as_tensor(st.offset, dtype=torch.float32) if st.nested else None)
            meta = copy.copy(st)  # shape, dtype, blocksize, quant type: its tensors are the buffers from now on
            meta.absmax = meta.code = meta.offset = None
            if st.nested:
                meta.state2 = copy.copy(st.state2)
                meta.state2.absmax = meta.state2.code = None
            self._state4 = meta
        self.inner.weight = None  # bitsandbytes' copy (CPU-repacked for 4-bit): not held twice
        self.path = "triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.path == "triton":
            from .triton import bnb as tb

            exact = x2d.device.type != "cuda"  # float16 tiles on a GPU's tensor cores, float32 under the interpreter
            if self.qtype == "int8":
                y = tb.matmul_int8(x2d, self.cb, self.scb, exact=exact)
            elif self._kernel(x2d) == "bnb":
                y = _bnb_matmul(x2d.to(self.compute_dtype), self.codes.view(-1, 1).t(), self._quant_state())
                if y is None:
                    return self.forward(x)  # bitsandbytes cannot run here: the Triton kernel from now on
                y = y.float()
            else:
                st = self._state4
                y = tb.matmul_4bit(x2d, self.codes, self.absmax, self.code, st.blocksize,
                                   (self.out_features, self.in_features), absmax2=self.absmax2, code2=self.code2,
                                   offset=self.offset, blocksize2=st.state2.blocksize if st.nested else 256,
                                   dtype=st.dtype, exact=exact)
            return kernels.finish(y, x, self.bias, self.out_features)
        y = self.inner(x2d.to(self.compute_dtype) if self.qtype != "int8" else x2d)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        if self.path == "triton":  # the stored weight as buffers (absmax nested as in the checkpoint), the bias
            return _tensor_bytes(*self.buffers(recurse=False), self.inner.bias)
        if self.qtype == "int8":
            return _tensor_bytes(*self._int8_parts(), self.inner.bias)
        qs = self.inner.weight.quant_state
        n = _tensor_bytes(self.inner.weight.data, qs.absmax, qs.code, self.inner.bias)
        if getattr(qs, "nested", False):
            n += _tensor_bytes(qs.state2.absmax, qs.state2.code)
        return n

    def config(self) -> dict[str, Any]:
        """What ``qadapt inspect`` reports for this layer."""
        out: dict[str, Any] = {"quant_type": self.qtype, "compute_dtype": str(self.compute_dtype).removeprefix("torch.")}
        if self.qtype == "int8":
            out["threshold"] = float(self.inner.state.threshold)
        else:
            out["blocksize"] = int(self._state4.blocksize)
            out["double_quant"] = bool(self._state4.nested)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "quant_type")


_BNB_CUDA_FAILED = False  # bitsandbytes failed on the GPU once (no CUDA binary for it): the Triton kernel since


def _bnb_matmul(x2d: torch.Tensor, packed_t: torch.Tensor, state) -> torch.Tensor | None:
    """``bitsandbytes.matmul_4bit`` (its CUDA kernels on a GPU); None, with a warning once, where it cannot run."""
    global _BNB_CUDA_FAILED
    try:
        import bitsandbytes as bnb

        return bnb.matmul_4bit(x2d, packed_t, quant_state=state)
    except Exception as e:  # noqa: BLE001 - an install without this GPU's binary raises RuntimeError/OSError
        import os

        if x2d.device.type != "cuda" or os.environ.get("QADAPT_BNB_KERNEL") == "bnb":
            raise
        _BNB_CUDA_FAILED = True
        log.warning("bitsandbytes' 4-bit kernel failed on %s (%s: %s); using qadapt's Triton kernel", x2d.device,
                    type(e).__name__, e)
        return None


def _check_quant(quant: str, compute_dtype: torch.dtype) -> None:
    if quant not in BNB_QTYPES:
        raise UnsupportedError(f"bitsandbytes quant type {quant!r} is not supported; use one of {', '.join(BNB_QTYPES)}")
    if compute_dtype not in _COMPUTE_DTYPES:
        raise UnsupportedError(f"bitsandbytes compute dtype must be one of float32, bfloat16, float16; got {compute_dtype}")


def make_bnb_linear(weight: torch.Tensor, bias: torch.Tensor | None, quant: str, *, mode: str = "inplace",
                    dtype: torch.dtype = torch.float32, double_quant: bool = False, name: str = "",
                    **kw: Any) -> BaseLinear:
    """Quantize-on-load: a :class:`BnbLinear` in place, or (dequantize mode) a :class:`DenseLinear`
    holding bitsandbytes' dequantization of the quantized weight."""
    layer = BnbLinear.quantize(weight, bias, quant, double_quant=double_quant, compute_dtype=dtype, name=name, **kw)
    if mode == "dequantize":
        return DenseLinear(layer.dequantize(dtype), bias, qtype=layer.qtype)
    return layer
