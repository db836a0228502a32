"""GPTQ linears: packed integer codes with per-group scales and zeros (transformers / GPTQModel layout).

Tensors per linear (``pack_dtype`` int32):

* ``qweight`` int32 [in * bits / 32, out]: codes packed along the input dimension;
* ``qzeros``  int32 [groups, out * bits / 32]: zero points packed along the output dimension;
* ``scales``  fp16  [groups, out];
* ``g_idx``   int32 [in]: the group of every input column (``i // group_size`` unless
  act-order reordered them); absent in some checkpoints, then ``i // group_size``;
* ``bias`` (optional).

``w[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``. For every bit width the
packing is one little-endian bit stream per column: value ``k`` of a run of 32 values sits at
bits ``bits*k .. bits*k + bits - 1`` of ``bits`` consecutive 32-bit words (for 3 bits this is
exactly the three-word layout of GPTQ's ``pack`` with its values 10 and 21 straddling words).
Checkpoint format ``gptq`` (v1) stores ``zero - 1`` in each field; ``gptq_v2`` the zero itself.
v1 is read per field (``field + 1``) as GPTQ's original v1 kernels do.

Matmul paths (see :mod:`qadapt.quant.kernels`):

==============================  ============  ===============================================
layer                           path          how
==============================  ============  ===============================================
4-bit, groups of a kernel size  ``int4pack``  ``scale * (q - z) == (q - 8) * scale + scale *
(32..256, or -1 / 512 / 1024                  (8 - z)``: torch's CPU int4 kernel with its zero
split into such groups), out                  ``scale * (8 - z)``. Act-order (``desc_act``):
a multiple of 16                              the input columns are permuted once at load so
                                              that each group is contiguous (stable argsort of
                                              ``g_idx``) and every input ``x`` gets the same
                                              column permutation before the kernel.
2, 3, 8 bits; other shapes      ``blockwise`` a chunk of output rows is dequantized (gathering
                                              each column's group through ``g_idx``, so any
                                              act-order works) into a bounded scratch, matmul
on a device (``device="cuda"``  ``triton``    :mod:`.triton.gptq`: the packed codes dequantized
or ``kernels="triton"``), 2/4/8               tile by tile in the kernel (2/4/8 bits)
==============================  ============  ===============================================
"""

from __future__ import annotations

import logging

import torch

from ..errors import FormatError, UnsupportedError
from . import kernels
from .base import BaseLinear, DenseLinear
from .kernels import INT4PACK_GROUPS, INT4PACK_ROW_MULTIPLE, Int4Packed, blockwise_matmul

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
PACK_BITS = 32


def gptq_qtype(bits: int) -> str:
    """The ``--quant`` / ``qtype`` name of a GPTQ bit width (``gptq-4bit``)."""
    return f"gptq-{bits}bit"


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 ``words`` [W, cols] packed along dim 0 -> codes int16 [n, cols] (the first ``n`` values).

    Each run of ``bits`` words holds 32 values as one little-endian bit stream.
    """
    if bits not in BITS:
        raise UnsupportedError(f"GPTQ bits={bits} is not supported; qadapt reads {BITS}")
    w, cols = words.shape
    pad = (-w) % bits
    u = words.to(torch.int64) & 0xFFFFFFFF
    if pad:
        u = torch.cat([u, u.new_zeros(pad, cols)])
    u = u.reshape(-1, bits, cols)
    u = torch.cat([u, u.new_zeros(u.shape[0], 1, cols)], dim=1)  # a zero word for the straddle read
    offsets = torch.arange(PACK_BITS) * bits
    word, shift = offsets // PACK_BITS, (offsets % PACK_BITS)
    lo = u[:, word] >> shift.view(1, -1, 1)
    hi = u[:, word + 1] << (PACK_BITS - shift).view(1, -1, 1)
    codes = ((lo | hi) & ((1 << bits) - 1)).to(torch.int16)
    return codes.reshape(-1, cols)[:n]


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`unpack_rows`: codes [n, cols] (0 .. 2**bits - 1) -> int32 words.

    Used by tests and tools that write GPTQ tensors; ``n`` is padded with zero codes to 32.
    """
    n, cols = codes.shape
    pad = (-n) % PACK_BITS
    c = codes.to(torch.int64)
    if pad:
        c = torch.cat([c, c.new_zeros(pad, cols)])
    c = c.reshape(-1, PACK_BITS, cols)
    u = torch.zeros(c.shape[0], bits + 1, cols, dtype=torch.int64)
    for k in range(PACK_BITS):
        word, shift = divmod(k * bits, PACK_BITS)
        u[:, word] |= (c[:, k] << shift) & 0xFFFFFFFF
        u[:, word + 1] |= c[:, k] >> (PACK_BITS - shift)
    words = u[:, :bits].reshape(-1, cols)
    n_words = (n * bits + PACK_BITS - 1) // PACK_BITS
    return words[:n_words].to(torch.int32)  # int64 -> int32 keeps the low 32 bits (two's complement)


class GPTQLinear(BaseLinear):
    """A GPTQ linear computed on its packed codes (``int4pack`` or ``blockwise``, see the module doc).

    ``compute_dtype`` (float32 or bfloat16) applies to the blockwise path; int4pack computes in
    bf16. ``dequantize()`` is exact: ``scale * (q - z)`` of an fp16 scale and integers below
    2**9 is representable in float32.
    """

    def __init__(
        self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
        bias: torch.Tensor | None = None, *, bits: int, group_size: int, checkpoint_format: str = "gptq",
        in_features: int | None = None, compute_dtype: torch.dtype = torch.float32, name: str = "",
    ):
        super().__init__()
        if bits not in BITS:
            raise UnsupportedError(f"{name}: GPTQ bits={bits} is not supported; qadapt reads {BITS}")
        if checkpoint_format not in CHECKPOINT_FORMATS:
            raise UnsupportedError(f"{name}: GPTQ checkpoint_format {checkpoint_format!r} is not supported; "
                                   f"qadapt reads {', '.join(CHECKPOINT_FORMATS)}")
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise UnsupportedError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype}")
        for t, what in ((qweight, "qweight"), (qzeros, "qzeros")):
            if t.dtype != torch.int32 or t.ndim != 2:
                raise FormatError(f"{name}: `{what}` must be a 2-D int32 tensor (pack_dtype int32), got "
                                  f"{t.dtype} {list(t.shape)}")
        self.bits, self.checkpoint_format, self.compute_dtype = bits, checkpoint_format, compute_dtype
        self.qtype = gptq_qtype(bits)
        self.name = name
        self.out_features = qweight.shape[1]
        self.in_features = in_features or qweight.shape[0] * PACK_BITS // bits
        out_f, in_f = self.out_features, self.in_features
        group = in_f if group_size in (-1, 0) else group_size
        n_groups = -(-in_f // group)
        expect = {
            "qweight": (-(-in_f * bits // PACK_BITS), out_f),
            "qzeros": (n_groups, -(-out_f * bits // PACK_BITS)),
            "scales": (n_groups, out_f),
        }
        for what, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            if tuple(t.shape) != expect[what]:
                raise FormatError(f"{name}: `{what}` has shape {list(t.shape)}; bits={bits}, group_size="
                                  f"{group_size} and [out={out_f}, in={in_f}] imply {list(expect[what])}")
        if g_idx is None:
            g_idx = torch.arange(in_f, dtype=torch.int32) // group
        g_idx = g_idx.to(torch.int32).reshape(-1)
        if g_idx.numel() != in_f or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
            raise FormatError(f"{name}: `g_idx` must hold {in_f} group indices in [0, {n_groups}), got "
                              f"{g_idx.numel()} in [{int(g_idx.min())}, {int(g_idx.max())}]")
        # registered storage: memory_bytes, state_dict and .to() see the packed weight and its int4 copy
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("g_idx", g_idx)
        zeros = unpack_rows(qzeros.t().contiguous(), bits, out_f).t()
        self.register_buffer("zeros", (zeros + 1 if checkpoint_format == "gptq" else zeros).contiguous())  # int16
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).reshape(-1))
        if self.bias is not None and self.bias.numel() != out_f:
            raise FormatError(f"{name}: `bias` has {self.bias.numel()} values, expected {out_f}")
        self.register_buffer("int4_packed", None)
        self.register_buffer("int4_scales", None)
        self._int4_group = 0
        self._perm: torch.Tensor | None = None
        self.path = "blockwise"
        if bits == 4:
            self._try_int4pack()

    # ------------------------------------------------------------------ dequantization
    def _codes(self, r0: int, r1: int) -> torch.Tensor:
        """Codes of output rows r0:r1 as int16 [in, r1 - r0] (columns of qweight: no unpacking of others)."""
        return unpack_rows(self.qweight[:, r0:r1], self.bits, self.in_features)

    def _dequant_rows(self, r0: int, r1: int) -> torch.Tensor:
        """float32 [r1 - r0, in]: exact ``scale * (q - z)`` of output rows r0:r1."""
        g = self.g_idx.long()
        q = self._codes(r0, r1)
        z = self.zeros[:, r0:r1].index_select(0, g)
        s = self.scales[:, r0:r1].float().index_select(0, g)
        return ((q - z).float() * s).t()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequant_rows(0, self.out_features).to(dtype).contiguous()

    # ------------------------------------------------------------------ int4 kernel
    def _try_int4pack(self) -> None:
        out_f, in_f = self.out_features, self.in_features
        if out_f % INT4PACK_ROW_MULTIPLE:
            return
        perm = torch.argsort(self.g_idx, stable=True)
        sorted_groups = self.g_idx[perm]
        for kg in sorted(INT4PACK_GROUPS, reverse=True):
            if in_f % kg == 0 and bool((sorted_groups.reshape(-1, kg) == sorted_groups[::kg, None]).all()):
                break
        else:
            return
        identity = bool((perm == torch.arange(in_f)).all())
        self._perm = None if identity else perm
        self._kgroups = sorted_groups[::kg].long()  # GPTQ group of each kernel group
        packed = Int4Packed.from_codes(self._int4_rows, out_f, kg)
        self.int4_packed, self.int4_scales, self._int4_group = packed.packed, packed.scales_and_zeros, packed.group
        self.path = "int4pack"

    @property
    def _int4(self) -> Int4Packed | None:
        return None if self.int4_packed is None else Int4Packed(self.int4_packed, self.int4_scales, self._int4_group)

    def _int4_rows(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self._codes(r0, r1)
        if self._perm is not None:
            q = q.index_select(0, self._perm)
        s = self.scales[:, r0:r1].float().index_select(0, self._kgroups)  # [in / kg, n]
        z = self.zeros[:, r0:r1].index_select(0, self._kgroups).float()
        return q.t(), s.t(), (s * (8 - z)).t()

    def use_triton(self) -> None:
        """Multiply with the Triton kernel (:mod:`.triton.gptq`, on a GPU or the CPU interpreter) on the
        packed codes as they are: the int4 kernel's CPU copy and the act-order permutation are dropped."""
        from .triton.gptq import BITS as TRITON_BITS

        if self.bits not in TRITON_BITS:
            raise UnsupportedError(f"{self.name}: {self.bits}-bit GPTQ in place on the device kernels is not "
                                   f"supported (they take {TRITON_BITS}-bit codes); load with mode='dequantize'")
        self.int4_packed = self.int4_scales = None
        self._perm, self._int4_group, self.path = None, 0, "triton"

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.path == "triton":
            from .triton.gptq import matmul as triton_matmul

            # float16 tiles on a GPU's tensor cores, float32 under the CPU interpreter (as the GGUF kernels)
            y = triton_matmul(x2d, self.qweight, self.zeros, self.scales, self.g_idx, self.bits,
                              exact=x2d.device.type != "cuda")
            return kernels.finish(y, x, self.bias, self.out_features)
        if self._int4 is not None and x2d.shape[0] <= kernels.INT4PACK_MAX_BATCH:
            xin = x2d if self._perm is None else x2d.index_select(1, self._perm)
            y = self._int4.matmul(xin)
        else:
            dtype = torch.bfloat16 if self._int4 is not None else self.compute_dtype
            y = blockwise_matmul(x2d, self._dequant_rows, self.out_features, self.in_features, dtype)
        return kernels.finish(y, x, self.bias, self.out_features)

    @property
    def nbytes(self) -> int:
        """Packed codes, scales, zeros (unpacked to int16), g_idx and bias, plus the int4 kernel's copy when used."""
        n = sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.g_idx, self.zeros))
        if self._int4 is not None:
            n += self._int4.nbytes
        return n + (0 if self.bias is None else self.bias.numel() * 4)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", format={self.checkpoint_format}, path={self.path}"
                + (", act_order" if self._perm is not None else ""))


def make_gptq_linear(
    tensors: dict[str, torch.Tensor], *, bits: int, group_size: int, checkpoint_format: str,
    shape: tuple[int, int], mode: str = "inplace", dtype: torch.dtype = torch.float32, name: str = "",
) -> BaseLinear:
    """A GPTQ linear from its tensors (``qweight``, ``qzeros``, ``scales``, optional ``g_idx``, ``bias``):
    computed in place, or dequantized once into a :class:`DenseLinear` of ``dtype``."""
    missing = [k for k in ("qweight", "qzeros", "scales") if k not in tensors]
    if missing:
        raise FormatError(f"{name}: GPTQ tensors {', '.join(missing)} are missing")
    layer = GPTQLinear(
        tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"), tensors.get("bias"),
        bits=bits, group_size=group_size, checkpoint_format=checkpoint_format, in_features=shape[1],
        compute_dtype=dtype if mode == "inplace" else torch.float32, name=name,
    )
    if (layer.out_features, layer.in_features) != tuple(shape):
        raise FormatError(f"{name}: GPTQ tensors describe [out={layer.out_features}, in={layer.in_features}], "
                          f"the config implies {list(shape)}")
    if mode == "dequantize":
        return DenseLinear(layer.dequantize(dtype), layer.bias, qtype=layer.qtype)
    return layer
