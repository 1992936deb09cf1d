"""NOLA (Koohpayegani et al. 2024, "NOLA: Compressing LoRA using Linear Combination of Random
Basis").

    ΔW = s·B·A,   A = Σ_{i<k_A} α_i·A_i,   B = Σ_{j<k_B} β_j·B_j

LoRA's factors re-parameterised as linear combinations of fixed random bases (A_i ``[r, in]``,
B_j ``[out, r]``, each ``U(-1/√cols, 1/√cols)``, drawn from the seed); only the coefficients α
``[k_A]`` and β ``[k_B]`` train, so the trainable count (k_A + k_B per layer) is decoupled from
both the rank and the layer's size. β starts at 0 (the output at step 0 is the base model's);
α ~ U(-√(3/k_A), √(3/k_A)), so E‖α‖² = 1 and A starts at LoRA's scale. s = alpha / r as LoRA.
The paper reports GPT-2 on E2E matching LoRA with a fraction of LoRA rank 1's parameters
("halve the parameters ... compared to LoRA with rank one").

Deliberate difference: the reference regenerates each layer's bases from a per-layer seed in every
forward (cheap on GPUs); here layers of the same shape share one basis tensor drawn once from
(seed, shape) and kept as a non-persistent buffer (regenerated at load, never saved), which keeps
CPU forward cheap and memory to one basis set per distinct shape. The coefficients differ per
layer, so every layer still has its own update.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import DenseBase, FactoredLinear, RandomBasisLowRank


class NOLAConfig(AdapterConfig):
    """``method: nola`` -- r (rank of every basis matrix), alpha, targets, rslora, seed,
    num_basis_A / num_basis_B (k_A, k_B: trainable coefficients per layer)."""

    method: Literal["nola"] = "nola"
    num_basis_A: int = Field(256, ge=1)
    num_basis_B: int = Field(256, ge=1)


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: NOLAConfig, prepared=None):
    W = linear.weight
    n_out, n_in = W.shape
    kw = {"dtype": W.dtype, "device": W.device}
    bound = math.sqrt(3.0 / config.num_basis_A)
    alpha = torch.empty(config.num_basis_A).uniform_(-bound, bound,
                                                     generator=layer_generator(config.seed, name))
    part = RandomBasisLowRank(n_in, n_out, config.r, config.seed, alpha.to(**kw),
                              torch.zeros(config.num_basis_B, **kw), config.scale)
    bias = None if linear.bias is None else linear.bias.data
    return FactoredLinear(n_in, n_out, base=DenseBase(W.data), lowrank=part, bias=bias)


METHODS.register("nola", NOLAConfig, init_layer=init_layer)
