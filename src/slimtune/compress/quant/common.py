"""Shared machinery of the quantisation steps (not a method itself).

A method supplies ``quantise(W, stats, spec) -> (q, grid, info)``: signed integers ``q [out, in]``
on ``grid`` (:mod:`slimtune.weights.quant`) for the weight ``W``. :class:`QuantStep` turns them
into the layer's packed base. A layer that earlier steps already factored keeps its parts: only
its dense base is quantised, its low-rank and sparse parts (``lowrank_first``, ``outliers``) stay
as they are. ``report[name]`` records bits, group size and the method's ``info`` (e.g. GPTQ's
damping), and :meth:`QuantStep.summary` the bits per weight of everything the layers store.
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from slimtune.compress.config import StepConfig
from slimtune.layers import DenseBase, FactoredLinear, PackedQuantBase
from slimtune.weights.quant import MAX_BITS, MIN_BITS, QuantSpec

Quantise = Callable[[Tensor, object, QuantSpec], tuple]


class QuantConfig(StepConfig):
    """Fields every quantisation method has: ``targets``, ``bits``, ``group_size``, ``sym``."""

    bits: int = Field(..., strict=True, description=f"bits per weight, {MIN_BITS}..{MAX_BITS}")
    group_size: int | None = Field(None, strict=True, description="input columns sharing one "
                                   "scale (and zero); null = one per output channel. Must "
                                   "divide every targeted layer's input width")
    sym: bool = Field(True, description="symmetric grid (zero point 0) or asymmetric")

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
        return QuantSpec(self.bits, self.group_size, self.sym)


def check_layer(config: QuantConfig, name: str, layer: nn.Module) -> None:
    """Before any work: the group size divides the layer's input width."""
    config.spec.group_width(layer.in_features)


def dense_part(layer: nn.Module) -> tuple[Tensor, FactoredLinear | None]:
    """The weight to quantise and the factored layer holding it (None for a plain linear)."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach(), None
    if isinstance(layer, FactoredLinear) and isinstance(layer.base, DenseBase) and (
            layer.mask is None and not layer.merged and layer.transform is None):
        return layer.base.dense_weight().detach(), layer
    raise TypeError(f"quantisation applies to an nn.Linear or a FactoredLinear with a plain dense "
                    f"base, got {type(layer).__name__}"
                    + (f" with a {type(layer.base).__name__} base" if hasattr(layer, "base")
                       else ""))


class QuantStep:
    """Pipeline step: quantise each target's dense weight with ``quantise`` and pack it."""

    def __init__(self, method: str, config: QuantConfig, needs: frozenset[str],
                 quantise: Quantise):
        self.method, self.config, self.quantise = method, config, quantise
        self.targets, self.needs = config.targets, frozenset(needs)
        self.report: dict[str, dict] = {}

    @torch.no_grad()
    def apply(self, name: str, layer: nn.Module, stats) -> nn.Module:
        W, factored = dense_part(layer)
        if not bool(torch.isfinite(W).all()):
            raise ValueError(f"a {tuple(W.shape)} weight to quantise contains NaN or Inf")
        q, grid, info = self.quantise(W, stats, self.config.spec)
        base = PackedQuantBase.from_integers(q, grid)
        base.scale = base.scale.to(device=W.device, dtype=W.dtype)
        if factored is None:
            bias = None if layer.bias is None else layer.bias.detach().clone()
            new = FactoredLinear(layer.in_features, layer.out_features, base=base, bias=bias)
        else:
            factored.base, new = base, factored
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
