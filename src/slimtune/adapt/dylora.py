"""DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter Efficient Tuning of Pre-trained Models using
Dynamic Search-Free Low-Rank Adaptation").

    A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)),  B [out, r] = 0          (LoRA's init)
    every step:  b ~ U{r_min, ..., r}
                 h = W·x + (alpha / b) · B[:, :b] · A[:b] · x
                 update the b-th row of A and column of B only     (update: last)
    evaluation:  any b ≤ r, the same formula (all r unless a rank is chosen)

Training with a random truncation sorts what the components learn by importance, so one
adapter works at every rank b ≤ r ("search-free"). The paper reports DyLoRA "at least 4 to 7
times ... faster than LoRA" (one run instead of a search over ranks) "without significantly
compromising performance", and consistent quality over a much larger range of ranks (GLUE with
RoBERTa; E2E, DART, WebNLG with GPT-2).

The rank is drawn once per optimiser step for the whole model (the method's ``before_step``),
from a generator seeded by ``(seed, step)``, so an interrupted run resumes with the same ranks;
it applies only in training mode (:class:`~slimtune.layers.NestedLowRank`), so the loop's
evaluations see the full adapter. ``update: last`` (default) is the paper's parameter update
(only the b-th row of W_dw and column of W_up change in a step; the first b - 1 components take
part in the forward, detached); ``update: all`` trains all of the first b. ``slimtune eval --adapter
DIR --adapter-rank b`` (:func:`slimtune.adapt.use_rank`) evaluates the trained adapter at rank b.
``rslora`` scales by alpha/sqrt(b) instead.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtune.adapt.factors import kaiming_uniform_A, layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import DenseBase, FactoredLinear, NestedLowRank
from slimtune.targets import factored_layers
from slimtune.weights.precision import compute_dtype


class DyLoRAConfig(AdapterConfig):
    """``method: dylora`` -- r (largest rank), alpha, targets, rslora, seed, r_min (smallest
    rank drawn, 1..r), update (last: only the b-th component trains in a step; all: the first
    b)."""

    method: Literal["dylora"] = "dylora"
    r_min: int = Field(1, ge=1)
    update: Literal["last", "all"] = "last"

    @model_validator(mode="after")
    def _range(self):
        if self.r_min > self.r:
            raise ValueError(f"r_min={self.r_min} exceeds r={self.r}")
        return self


def init_layer(name: str, linear: nn.Linear, config: DyLoRAConfig, prepared=None):
    W = linear.weight
    g = layer_generator(config.seed, name)
    A = kaiming_uniform_A(config.r, linear.in_features, g, compute_dtype(W), "cpu")
    kw = {"dtype": W.dtype, "device": W.device}
    part = NestedLowRank(A.to(**kw), torch.zeros(linear.out_features, config.r, **kw),
                         config.alpha, config.rslora, config.update)
    bias = None if linear.bias is None else linear.bias.data
    return FactoredLinear(linear.in_features, linear.out_features, base=DenseBase(W.data),
                          lowrank=part, bias=bias)


def step_rank(config: DyLoRAConfig, step: int) -> int:
    """The rank b of optimiser step ``step`` (0-based): uniform on ``[r_min, r]``, seeded by
    ``(seed, step)``."""
    g = layer_generator(config.seed, f"dylora/{step}")
    return int(torch.randint(config.r_min, config.r + 1, (1,), generator=g))


def before_step(model: nn.Module, config: DyLoRAConfig, step: int) -> None:
    """``before_step``: every adapted layer trains this step at its rank b."""
    b = step_rank(config, step)
    for layer in factored_layers(model).values():
        layer.lowrank.sample(b)


def finish(model: nn.Module, config: DyLoRAConfig) -> None:
    """``finish``: no drawn rank any more; the trained model runs at full rank."""
    for layer in factored_layers(model).values():
        layer.lowrank.sample(None)


METHODS.register("dylora", DyLoRAConfig, init_layer=init_layer, before_step=before_step,
                 finish=finish)
