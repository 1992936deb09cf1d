"""SLTrain (Han et al. 2024, "SLTrain: a sparse plus low-rank approach for parameter and memory
efficient pretraining").

    W = s·B·A + S,   S = Σ_{(i,j) ∈ Ω} v_ij·e_i·e_jᵀ,   |Ω| = ⌊density·out·in⌋, Ω fixed

The weight is a low-rank product plus a sparse matrix whose support Ω is drawn uniformly at random
once and never changes; B, A and the values v train. The paper reports perplexities comparable to
full-rank pretraining of LLaMA 60M-7B with far fewer parameters, and "up to 73%" less memory for
LLaMA-7B pretraining together with quantisation and per-layer updates.

Initialisation as the reference code (andyjm3/SLTrain, ``splora/splora_linear.py``):
A ~ U(-1/√in, 1/√in) (``kaiming_uniform_(a=√5)``, as LoRA), B = 0, v ~ U(-1/√in, 1/√in) (the
bound of ``nn.Linear``), s = alpha / r, Ω the first ⌊density·out·in⌋ positions of a random
permutation, sorted. Its pretraining scripts use density (``sp_ratio``) 0.03, the default here,
with r = 256 and alpha = 16 for LLaMA-130M. A, Ω and v are drawn in that order from a generator
seeded by ``(seed, layer name)``, so the support is reproducible from the config; it is also saved
with the adapter (the sparse part's indices).

``keep_base: false`` (default, the paper's pretraining setting): the layer has no base; it *is*
``s·B·A + S`` and starts at ``S`` (B = 0), not at the base model's output, and the original weight
is dropped. ``keep_base: true`` (the fine-tuning variant, not in the paper): the frozen weight stays
as the base and both updates start at zero (B = 0, v = 0), so the output at step 0 is the base
model's exactly; A is drawn as above. The bias, if any, stays frozen as in every adapter.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import kaiming_uniform_A, layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import DenseBase, FactoredLinear, LowRank, SparseDelta
from slimtune.weights.precision import compute_dtype
from slimtune.weights.sparse_support import check_support_size, random_support, support_size


class SLTrainConfig(AdapterConfig):
    """``method: sltrain`` -- r, alpha, targets, rslora, seed, density (fraction of the weight's
    entries in the fixed random support, (0, 1]), keep_base (keep the frozen weight as the base)."""

    method: Literal["sltrain"] = "sltrain"
    density: float = Field(0.03, gt=0, le=1)
    keep_base: bool = False

    @property
    def exact_start(self) -> bool:
        return self.keep_base


def check_layer(config: SLTrainConfig, name: str, linear: nn.Linear) -> None:
    check_support_size("sltrain", "density", config.density, name, tuple(linear.weight.shape))


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: SLTrainConfig, prepared=None):
    check_layer(config, name, linear)
    W = linear.weight
    n_out, n_in = W.shape
    dtype, kw = compute_dtype(W), {"dtype": W.dtype, "device": W.device}
    g = layer_generator(config.seed, name)
    A = kaiming_uniform_A(config.r, n_in, g, dtype, "cpu")
    B = torch.zeros(n_out, config.r, dtype=dtype)
    indices = random_support(n_out * n_in, support_size(config.density, n_out, n_in), g)
    values = torch.zeros(indices.numel(), dtype=dtype)
    if not config.keep_base:
        bound = 1.0 / math.sqrt(n_in)
        values.uniform_(-bound, bound, generator=g)
    lowrank = LowRank(A.to(**kw), B.to(**kw), config.scale)
    sparse = SparseDelta((n_out, n_in), indices.to(W.device), values.to(**kw))
    base = DenseBase(W.data) if config.keep_base else None
    bias = None if linear.bias is None else linear.bias.data
    return FactoredLinear(n_in, n_out, base=base, lowrank=lowrank, sparse=sparse, bias=bias)


METHODS.register("sltrain", SLTrainConfig, init_layer=init_layer, check_layer=check_layer)
