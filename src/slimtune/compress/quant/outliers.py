"""Outliers kept exactly beside a quantised base (the dense-and-sparse split of SqueezeLLM, Kim
et al. 2023, and EasyQuant, Tang et al. 2023).

In each targeted weight the ``floor(fraction · numel)`` entries with the largest score move to the
layer's sparse part, exact, in float; the base keeps the rest (those entries set to 0), so the
quantiser that follows in the recipe sees a weight with a much smaller range. Scores: ``by:
magnitude`` ``|W_ij|``; ``by: hessian`` ``W_ij² · H_jj`` with ``H_jj ∝ Σ x_j²`` over the
calibration tokens (the loss increase of a lost weight under a diagonal Hessian). Each kept
entry costs an int64 index and a value (96 bits at float32), counted in the bits per weight.

Reported (METHODS.md, seeds/004): keeping ~0.5-1% outliers recovers most of 3-bit's loss.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.compress.config import StepConfig
from slimtune.compress.layer_weight import dense_part, with_base
from slimtune.compress.registry import METHODS
from slimtune.layers import DenseBase, SparseDelta
from slimtune.weights.compensation import top_entries
from slimtune.weights.sparsity import prune_count


class OutliersConfig(StepConfig):
    """``method: outliers`` -- targets, fraction, by."""

    method: Literal["outliers"] = "outliers"
    fraction: float = Field(..., ge=0, lt=1, description="fraction of each weight kept exactly "
                            "(e.g. 0.005)")
    by: Literal["magnitude", "hessian"] = Field("magnitude", description="score: |W| or "
                                                "W² · diag(XᵀX)")


class OutliersStep:
    def __init__(self, config: OutliersConfig):
        self.config, self.targets = config, config.targets
        self.needs = frozenset({"mean_abs"}) if config.by == "hessian" else frozenset()

    @torch.no_grad()
    def apply(self, name: str, layer: nn.Module, stats) -> nn.Module:
        W, factored = dense_part(layer)
        if factored is not None and factored.sparse is not None:
            raise ValueError("the layer has a sparse part already")
        scores = W.detach().to(torch.float64).square()
        if self.config.by == "hessian":
            if stats.inputs is None or stats.inputs.n_tokens == 0:
                raise ValueError("outliers by hessian needs the layer's calibration inputs")
            scores = scores * stats.inputs.sq_sum.to(scores)[None, :]
        idx = top_entries(scores, prune_count(self.config.fraction, W.numel()))
        rest = W.detach().clone().reshape(-1)
        values = rest[idx].clone()
        rest[idx] = 0
        new = with_base(layer, DenseBase(rest.view(W.shape)), factored)
        new.sparse = SparseDelta(tuple(W.shape), idx, values, trainable=False)
        return new

    def __repr__(self) -> str:
        return f"OutliersStep(fraction={self.config.fraction:g}, by={self.config.by})"


METHODS.register("outliers", OutliersConfig, build=OutliersStep)
