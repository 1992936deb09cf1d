"""Bases of a ``FactoredLinear``: the frozen weight the low-rank and sparse parts are added to.

A base has ``kind``, ``dense_weight()``, ``forward(x)`` and ``add_(delta)``; :class:`DenseBase` is
the plain one, :class:`PackedQuantBase` holds b-bit integers packed densely
(:mod:`slimtune.weights.packing`) with a scale (and zero point) per output row and group
(:mod:`slimtune.weights.quant`). A base with settings has ``config()``, saved beside its kind.
:data:`BASES` maps ``kind`` to a constructor of an empty base of a given shape (and config), for
rebuilding saved layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.layers.kernels import quant_matmul
from slimtune.weights.packing import pack, packed_bytes, unpack
from slimtune.weights.quant import Grid, QuantSpec, dequantize


class DenseBase(nn.Module):
    """A frozen dense weight (out × in)."""

    kind = "dense"

    def __init__(self, weight: Tensor, trainable: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=trainable)

    def dense_weight(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    @torch.no_grad()
    def add_(self, delta: Tensor) -> None:
        self.weight.add_(delta.to(self.weight.dtype))


class PackedQuantBase(nn.Module):
    """A frozen quantised weight: integers on a :class:`~slimtune.weights.quant.Grid`, stored as
    ``packed`` (uint8 ``[out, ceil(in·bits/8)]``, unsigned ``q - q_min``), ``scale`` (float
    ``[out, groups]``) and ``zero`` (int8 ``[out, groups]``, all 0 when symmetric).

    ``forward`` runs PyTorch's CPU weight-only kernel where one applies
    (:mod:`slimtune.layers.kernels`), else dequantises the weight per call. It cannot absorb updates (``add_`` refuses):
    a layer with a packed base keeps its low-rank and sparse parts separate, or becomes dense
    through ``FactoredLinear.to_dense``."""

    kind = "packed_int"

    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor, in_features: int, bits: int,
                 group_size: int | None, sym: bool, fp16_scales: bool = False):
        super().__init__()
        self.spec = QuantSpec(bits, group_size, sym, fp16_scales)
        self.in_features = in_features
        self.spec.group_width(in_features)  # validates the group size
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self._kernel_cache = None  # a CPU kernel's prepared operands (slimtune.layers.kernels)

    @classmethod
    def from_integers(cls, q: Tensor, grid: Grid) -> "PackedQuantBase":
        """Pack signed integers ``q [out, in]`` on ``grid`` (as :func:`quantize` returns them)."""
        packed = pack((q - grid.spec.q_min).to(torch.int32), grid.spec.bits)
        return cls(packed, grid.scale.clone(), grid.zero.to(torch.int8).clone(), q.shape[1],
                   grid.spec.bits, grid.spec.group_size, grid.spec.sym, grid.spec.fp16_scales)

    @classmethod
    def empty(cls, n_out: int, n_in: int, bits: int, group_size: int | None, sym: bool,
              fp16_scales: bool = False, dtype=torch.float32, device=None) -> "PackedQuantBase":
        spec = QuantSpec(bits, group_size, sym, fp16_scales)
        groups = n_in // spec.group_width(n_in)
        return cls(torch.zeros(n_out, packed_bytes(1, n_in, bits), dtype=torch.uint8,
                               device=device),
                   torch.ones(n_out, groups, dtype=dtype, device=device),
                   torch.zeros(n_out, groups, dtype=torch.int8, device=device), n_in, bits,
                   group_size, sym, fp16_scales)

    def config(self) -> dict:
        config = {"bits": self.spec.bits, "group_size": self.spec.group_size, "sym": self.spec.sym}
        return {**config, "fp16_scales": True} if self.spec.fp16_scales else config

    def integers(self) -> Tensor:
        """The signed integers ``[out, in]`` (int32)."""
        return unpack(self.packed, self.spec.bits, self.in_features) + self.spec.q_min

    def grid(self) -> Grid:
        return Grid(self.spec, self.scale, self.zero.to(torch.int32))

    def dense_weight(self) -> Tensor:
        return dequantize(self.integers(), self.grid(), dtype=self.scale.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W_hatᵀ``: through PyTorch's CPU weight-only kernel where one applies
        (:mod:`slimtune.layers.kernels`), else by dequantising the whole weight."""
        out = quant_matmul(self, x)
        return F.linear(x, self.dense_weight().to(x.dtype)) if out is None else out

    def add_(self, delta: Tensor) -> None:
        raise ValueError("a packed quantised base cannot absorb an update: keep the low-rank or "
                         "sparse part separate, or convert the layer with to_dense()")

    def storage_bits(self) -> int:
        """Bits stored: the packed integers, the scales and the zero points, as saved."""
        return 8 * sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))


BASES = {
    DenseBase.kind: lambda n_out, n_in, config=None, **kw: DenseBase(
        torch.empty(n_out, n_in, **kw)),
    PackedQuantBase.kind: lambda n_out, n_in, config=None, **kw: PackedQuantBase.empty(
        n_out, n_in, **(config or {}), **kw),
}


def build_base(kind: str, n_out: int, n_in: int, config: dict | None = None, **kw) -> nn.Module:
    if kind not in BASES:
        raise ValueError(f"unknown base kind {kind!r}; known: {sorted(BASES)}")
    return BASES[kind](n_out, n_in, config=config, **kw)
