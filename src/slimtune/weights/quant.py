"""The integer grid of weight quantisation: b-bit groups along the input dimension, symmetric or
asymmetric, with one float scale (and integer zero point) per output row and group.

For ``W [out, in]`` and ``group_size g`` (``None``: one group per output row, "per channel")
the columns split into ``in / g`` groups; every (row, group) gets ``scale`` and ``zero`` from the
min and max of its values, the range always widened to include 0 (so 0 is exact)::

    q_min, q_max = -2^(b-1), 2^(b-1) - 1                       (signed integers)
    symmetric:  scale = max(|min|, |max|) / ((q_max - q_min) / 2),   zero = 0
    asymmetric: scale = (max - min) / (q_max - q_min),  zero = clamp(q_min - round(min / scale))
    q = clamp(round(w / scale) + zero, q_min, q_max),   w_hat = (q - zero) · scale

(the convention of compressed-tensors, which llm-compressor writes and vLLM and transformers
read). A group whose values are all 0 gets scale 1. :func:`fit_grid` fixes the grid from a
weight (what RTN uses, and what GPTQ fixes per group before its solve); :func:`quantize` /
:func:`dequantize` map values through a fixed grid column by column or all at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slimtune.weights.precision import compute_dtype

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QuantSpec:
    """``bits`` in 2..8, ``group_size`` (None = per output channel), ``sym``, and
    ``fp16_scales``: every scale rounded to a float16 value (GGUF's blocks store fp16 scales, so
    such a grid reaches llama.cpp bit-exactly)."""

    bits: int
    group_size: int | None = None
    sym: bool = True
    fp16_scales: bool = False

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not (
                MIN_BITS <= self.bits <= MAX_BITS):
            raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(
                self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")

    @property
    def q_min(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def q_max(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def group_width(self, in_features: int) -> int:
        """The group size for a layer of ``in_features`` inputs; ValueError if it does not divide
        them."""
        g = in_features if self.group_size is None else self.group_size
        if in_features % g:
            raise ValueError(f"group_size {g} does not divide the {in_features} inputs")
        return g


@dataclass
class Grid:
    """A fixed grid for one weight: ``scale`` and ``zero`` ``[out, n_groups]`` (float, int32)."""

    spec: QuantSpec
    scale: Tensor
    zero: Tensor

    def columns(self, j: int | slice, group: int) -> tuple[Tensor, Tensor]:
        """``(scale, zero)`` of input column(s) ``j`` as ``[out, 1]`` / ``[out, k]`` tensors."""
        if isinstance(j, int):
            return self.scale[:, j // group, None], self.zero[:, j // group, None]
        idx = torch.arange(j.start, j.stop, device=self.scale.device) // group
        return self.scale[:, idx], self.zero[:, idx]


def fit_grid(W: Tensor, spec: QuantSpec) -> Grid:
    """The grid of ``W [out, in]`` by the min/max rule in the module docstring."""
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    g = spec.group_width(W.shape[1])
    dtype = compute_dtype(W)
    groups = W.detach().to(dtype).reshape(W.shape[0], -1, g)
    lo = groups.amin(dim=2).clamp_max(0)
    hi = groups.amax(dim=2).clamp_min(0)
    span = spec.q_max - spec.q_min
    if spec.sym:
        scale = _rounded(torch.maximum(lo.abs(), hi) / (span / 2), spec)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = _rounded((hi - lo) / span, spec)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = (spec.q_min - torch.round(lo / safe)).clamp(spec.q_min, spec.q_max)
        zero = zero.to(torch.int32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return Grid(spec, scale, zero)


def _rounded(scale: Tensor, spec: QuantSpec) -> Tensor:
    """``scale`` itself, or (``fp16_scales``) its nearest float16 values, tiny positive ones
    kept at float16's smallest subnormal rather than flushed to 0."""
    if not spec.fp16_scales:
        return scale
    if bool((scale > torch.finfo(torch.float16).max).any()):
        raise ValueError("fp16_scales: a scale exceeds float16's range (weights above ~5e5)")
    tiny = torch.where(scale > 0, scale.clamp_min(2.0 ** -24), scale)
    return tiny.to(torch.float16).to(scale.dtype)


def quantize_values(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Integers ``q = clamp(round(w / scale) + zero, q_min, q_max)`` (same shape as ``w``)."""
    return (w / scale).round_().add_(zero).clamp_(spec.q_min, spec.q_max)


def dequantize_values(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    return (q - zero) * scale


def quantize(W: Tensor, grid: Grid) -> Tensor:
    """The integers of ``W [out, in]`` on ``grid``, as int32 ``[out, in]``."""
    g = grid.spec.group_width(W.shape[1])
    scale = grid.scale.repeat_interleave(g, dim=1)
    zero = grid.zero.repeat_interleave(g, dim=1).to(scale.dtype)
    return quantize_values(W.detach().to(scale.dtype), scale, zero, grid.spec).to(torch.int32)


def dequantize(q: Tensor, grid: Grid, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(q - zero) · scale`` for integers ``q [out, in]`` on ``grid``, in ``dtype``."""
    rows, n = q.shape
    g = grid.spec.group_width(n)
    scale = grid.scale.unsqueeze(-1)  # [out, groups, 1], broadcast over each group's columns
    zero = grid.zero.to(scale.dtype).unsqueeze(-1)
    W = dequantize_values(q.to(scale.dtype).view(rows, n // g, g), scale, zero)
    return W.view(rows, n).to(dtype)


def round_to_nearest(W: Tensor, spec: QuantSpec) -> tuple[Tensor, Grid]:
    """RTN: ``(integers [out, in], grid)`` of ``W`` on its own min/max grid."""
    grid = fit_grid(W, spec)
    return quantize(W, grid), grid
