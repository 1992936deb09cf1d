"""Shared machinery of the quantisation steps (not a method itself).

A method supplies ``quantise(W, stats, spec, keep) -> (q, grid, info)``: signed integers
``q [out, in]`` on ``grid`` (:mod:`slimtune.weights.quant`) for the weight ``W``; ``keep`` is the
layer's pruning mask (None if unpruned), whose pruned entries must stay zero.
:class:`QuantStep` turns them into the layer's packed base (and sets every pruned entry to its
group's zero point, so it dequantises to exactly 0 whatever the method did). A layer that
earlier steps already factored keeps its parts: only its dense base is quantised, its mask and
its low-rank and sparse parts (``lowrank_first``, ``outliers``) stay as they are. ``report[name]`` records bits, group size and the method's ``info`` (e.g. GPTQ's
damping), and :meth:`QuantStep.summary` the bits per weight of everything the layers store.
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from slimtune.compress.config import StepConfig
from slimtune.compress.layer_weight import dense_part, with_base
from slimtune.layers import PackedQuantBase
from slimtune.weights.precision import all_finite
from slimtune.weights.quant import MAX_BITS, MIN_BITS, QuantSpec

Quantise = Callable[[Tensor, object, QuantSpec, "Tensor | None"], tuple]


class QuantConfig(StepConfig):
    """Fields every quantisation method has: ``targets``, ``bits``, ``group_size``, ``sym``."""

    bits: int = Field(..., strict=True, description=f"bits per weight, {MIN_BITS}..{MAX_BITS}")
    group_size: int | None = Field(None, strict=True, description="input columns sharing one "
                                   "scale (and zero); null = one per output channel. Must "
                                   "divide every targeted layer's input width")
    sym: bool = Field(True, description="symmetric grid (zero point 0) or asymmetric")
    fp16_scales: bool = Field(False, description="round every scale to float16 while "
                              "quantising, so GGUF's fp16-scaled blocks carry the result "
                              "bit-exactly (slimtune export --format gguf)")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if not MIN_BITS <= v <= MAX_BITS:
            raise ValueError(f"must be in {MIN_BITS}..{MAX_BITS}, got {v}")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"must be a positive number of input columns or null, got {v}")
        return v

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym, self.fp16_scales)


def check_layer(config: QuantConfig, name: str, layer: nn.Module) -> None:
    """Before any work: the group size divides the layer's input width."""
    config.spec.group_width(layer.in_features)


class QuantStep:
    """Pipeline step: quantise each target's dense weight with ``quantise`` and pack it."""

    def __init__(self, method: str, config: QuantConfig, needs: frozenset[str],
                 quantise: Quantise):
        self.method, self.config, self.quantise = method, config, quantise
        self.targets, self.needs = config.targets, frozenset(needs)
        self.stats_dtype = torch.float32  # X^T X for a damped Hessian (llm-compressor: float32)
        self.report: dict[str, dict] = {}

    @torch.no_grad()
    def apply(self, name: str, layer: nn.Module, stats) -> nn.Module:
        W, factored = dense_part(layer)
        if not all_finite(W):
            raise ValueError(f"a {tuple(W.shape)} weight to quantise contains NaN or Inf")
        keep = None if factored is None else factored.mask
        q, grid, info = self.quantise(W, stats, self.config.spec, keep)
        if keep is not None:
            g = self.config.spec.group_width(W.shape[1])
            q = torch.where(keep, q, grid.zero.to(q.dtype).repeat_interleave(g, dim=1))
        base = PackedQuantBase.from_integers(q, grid)
        base.scale = base.scale.to(device=W.device, dtype=W.dtype)
        new = with_base(layer, base, factored)
        self.report[name] = {"bits": self.config.bits, "group_size": self.config.group_size,
                             "weights": W.numel(), "base_bits": base.storage_bits(), **info}
        return new

    def summary(self) -> dict:
        """Bits per weight of the quantised bases (packed integers, scales, zeros)."""
        weights = sum(r["weights"] for r in self.report.values())
        bits = sum(r["base_bits"] for r in self.report.values())
        return {"weights": weights, "bits_per_weight": bits / weights if weights else 0.0}

    def __repr__(self) -> str:
        c = self.config
        return f"QuantStep({self.method}, bits={c.bits}, group_size={c.group_size}, sym={c.sym})"
