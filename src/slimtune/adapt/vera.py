"""VeRA (Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation").

    ΔW = diag(b)·B·diag(d)·A,   A = A_shared[:, :in],  B = B_shared[:out, :]

One pair of random matrices ``A_shared [r, max_in]``, ``B_shared [max_out, r]`` (max over the
adapted layers) is drawn once from the seed and shared, frozen, by every layer; each layer trains
only two vectors, d ``[r]`` (init ``d_initial``, 0.1) and b ``[out]`` (init 0, so the output at
step 0 is the base model's). The pair is drawn as PEFT draws it (``kaiming_uniform_`` with gain
√2 from a CPU generator seeded ``seed``, A first), so a ``vera`` adapter and PEFT's ``VeraConfig(
projection_prng_key=seed)`` agree; it is regenerated at load, never saved: the adapter holds d
and b alone. There is no scaling (``alpha`` is unused) and r may exceed a layer's dimensions.
The paper reports LoRA-level GLUE and E2E results with 10x fewer trainable parameters than
LoRA (RoBERTa-large: 0.061M vs 0.8M).
"""
from __future__ import annotations

import sys
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import DenseBase, FactoredLinear, ScaledRandomLowRank


class VeRAConfig(AdapterConfig):
    """``method: vera`` -- r (rows of the shared pair), targets, seed (the shared pair's PRNG key),
    d_initial (start of every d)."""

    method: Literal["vera"] = "vera"
    d_initial: float = Field(0.1, description="initial value of the scaling vector d")

    def rank_limit(self, n_out: int, n_in: int) -> int:
        return sys.maxsize  # the shared pair is r x max_in and max_out x r: any r fits


def plan(model: nn.Module, names: list[str], config: VeRAConfig) -> dict:
    """Every layer gets the shared pair's shape ``(max_out, max_in)`` over the targets."""
    shapes = [model.get_submodule(n).weight.shape for n in names]
    largest = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    return {n: largest for n in names}


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: VeRAConfig, prepared=None):
    W = linear.weight
    n_out, n_in = W.shape
    kw = {"dtype": W.dtype, "device": W.device}
    d = torch.full((config.r,), config.d_initial, **kw)
    part = ScaledRandomLowRank(n_in, n_out, config.r, config.seed, prepared or (n_out, n_in), d,
                               torch.zeros(n_out, **kw))
    bias = None if linear.bias is None else linear.bias.data
    return FactoredLinear(n_in, n_out, base=DenseBase(W.data), lowrank=part, bias=bias)


METHODS.register("vera", VeRAConfig, init_layer=init_layer, plan=plan)
