"""Shared machinery of the pruning steps (not a method itself).

A method supplies ``prune(name, W, stats) -> (weight, mask, info)``: the pruned weight (exactly 0
where ``mask`` is False) for the dense weight ``W [out, in]``. :class:`PruneStep` makes it the
layer's dense base and stores the mask as the layer's bitmask (``FactoredLinear.mask_bits``,
one bit per weight), so later steps (a quantiser, a compensation) keep the pruned entries at
zero. The dense base still stores every entry; a following quantisation step is what makes the
layer smaller (the zeros are then integers at the zero point of their group).

Configs: ``sparsity`` in [0, 1) and ``pattern``: ``unstructured`` or ``"N:M"`` (N kept of every
M consecutive inputs of a row; ``sparsity`` is then ``1 - N/M`` and may be left out).
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from slimtune.compress.config import StepConfig
from slimtune.compress.layer_weight import dense_part, with_base
from slimtune.layers import DenseBase
from slimtune.weights.precision import all_finite
from slimtune.weights.sparsity import parse_pattern

Prune = Callable[[str, Tensor, object], tuple]


class PruneConfig(StepConfig):
    """Fields every pruning method has: ``targets``, ``sparsity``, ``pattern``."""

    sparsity: float | None = Field(None, description="fraction of each layer's weights set to "
                                   "zero, in [0, 1); implied by an N:M pattern")
    pattern: str = Field("unstructured", description="'unstructured' or 'N:M' (keep N of every "
                         "M consecutive inputs of each row, e.g. '2:4')")

    @field_validator("sparsity", mode="before")
    @classmethod
    def _sparsity(cls, v):
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number in [0, 1), got {v!r}")
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1) (the fraction of weights set to zero), got {v}")
        return float(v)

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, v):
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError(f"must be a string such as '2:4'; got the number {v} (YAML reads an "
                             "unquoted 2:4 as the base-60 number 124: quote it, \"2:4\")")
        parse_pattern(v)
        return v.strip().lower()

    @model_validator(mode="after")
    def _consistent(self):
        nm = self.nm
        if nm is None and self.sparsity is None:
            raise ValueError("sparsity: required for an unstructured pattern")
        if nm is not None and self.sparsity is not None and abs(
                self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(f"sparsity: {self.sparsity} contradicts the pattern "
                             f"{self.pattern!r}, which is {1 - nm[0] / nm[1]:g} sparse")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def fraction(self) -> float:
        nm = self.nm
        return self.sparsity if nm is None else 1 - nm[0] / nm[1]


def check_layer(config: PruneConfig, name: str, layer: nn.Module) -> None:
    """Before any work: M of an N:M pattern divides the layer's input width."""
    nm = config.nm
    if nm is not None and layer.in_features % nm[1]:
        raise ValueError(f"pattern {config.pattern!r}: M={nm[1]} does not divide the input "
                         f"width {layer.in_features}")


class PruneStep:
    """Pipeline step: prune each target's dense weight with ``prune`` and store the mask."""

    def __init__(self, method: str, config: PruneConfig, needs: frozenset[str], prune: Prune,
                 prepare: Callable | None = None, sequential: str = "layer",
                 stats_precision: str = "float32"):
        self.method, self.config, self.prune = method, config, prune
        self.targets, self.needs = config.targets, frozenset(needs)
        self.sequential = sequential  # the statistics order the pipeline runs by default
        self.stats_dtype = torch.float32  # X^T X for a damped Hessian (llm-compressor: float32)
        self.stats_precision = stats_precision  # the lowest its block-order forward may use
        self.report: dict[str, dict] = {}
        if prepare is not None:
            self.prepare = prepare

    @torch.no_grad()
    def apply(self, name: str, layer: nn.Module, stats) -> nn.Module:
        W, factored = dense_part(layer)
        if factored is not None and factored.mask_bits is not None:
            raise ValueError("the layer is pruned already (it has a mask); prune it once")
        if not all_finite(W):
            raise ValueError(f"a {tuple(W.shape)} weight to prune contains NaN or Inf")
        weight, mask, info = self.prune(name, W, stats)
        base = DenseBase(weight.to(device=W.device, dtype=W.dtype).contiguous())
        self.report[name] = {"weights": W.numel(), "pruned": int((~mask).sum()), **info}
        return with_base(layer, base, factored, mask=mask)

    def summary(self) -> dict:
        weights = sum(r["weights"] for r in self.report.values())
        pruned = sum(r["pruned"] for r in self.report.values())
        return {"weights": weights, "sparsity": pruned / weights if weights else 0.0}

    def __repr__(self) -> str:
        c = self.config
        return f"PruneStep({self.method}, sparsity={c.fraction:g}, pattern={c.pattern})"
