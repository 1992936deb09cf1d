"""SaRA (Hu, Zhang, Yi, Huang, Wang, Ma 2024, "SaRA: High-Efficient Diffusion Model
Fine-tuning with Progressive Sparse Low-Rank Adaptation").

    Ω  = the k = ⌊fraction·out·in⌋ entries of W with the smallest |W_ij|  (ties: lower index)
    W' = W + P,   P = Σ_{(i,j) ∈ Ω} p_ij·e_i·e_jᵀ,   p = 0 at the start    (p trains)
    loss += λ·||P_l||_*   for one layer l per step, drawn at random   (low-rank sparse training)
    once, after step t = ⌊reselect_at·T⌋ (progressive adjustment):
        W  ← W + P on Ω ∖ Ω'                             (what was learnt there is merged)
        Ω' = the k smallest |W + P|;  p keeps its value on Ω ∩ Ω' and is 0 on the new entries,
             whose optimiser state is zeroed

The paper finds that the smallest 10-20% of a pretrained diffusion model's weights by magnitude
do not contribute to generation and re-trains them; it reports better generalisation than LoRA
when fine-tuning Stable Diffusion (no single number; METHODS.md lists none). The defaults are
the reference code's (sjtuplayer/SaRA, ``finetune.sh``): λ = 5e-4 and the re-selection half-way
(``progressive_iter`` 2500 of 5005 steps); fraction 0.1, the low end of the paper's 10-20%.

The nuclear norm is the reference's affordable form: each step one layer, drawn from a
generator seeded by ``(seed, step)`` (the reference draws ``random.choice``), pays λ·Σσ(P_l).
That is one thin SVD of one out × in matrix per step (about 0.05 s for 1536 × 576 in float32 on
two CPU cores), taken outside autograd: the term is ``λ·<U_k·V_kᵀ, P_l>`` over the k non-zero
singular values, whose value is the nuclear norm and whose gradient is its sub-gradient
λ·U_k·V_kᵀ (0 at P = 0, where autograd through an SVD would push along arbitrary singular
vectors). The merged part of the re-selection is the layer's ``origin``, a frozen
``SparseDelta`` holding -P on Ω ∖ Ω' (the base is W - origin), so :func:`slimtune.adapt.load`
rebuilds the re-selected layer exactly from a fresh base; the adapter then holds at most 2k
entries.

Differences from the reference code. It selects by an absolute threshold (|W| < 2e-3 for
Stable Diffusion), so the number of trained entries changes at re-selection and its optimiser is
rebuilt; here a fraction fixes k, so the value vector keeps its size and only the new entries
restart. It penalises the selected weights themselves (W + P on Ω); here the penalty is on the
update P (zero at the start, so the start is exact). It re-selects instead of the optimiser step
of that iteration; here after that step. Its "unstructural backpropagation" (a memory trick) is
the sparse part's own: only k values and their optimiser state are held. ``r``, ``alpha`` and
``rslora`` are accepted but not used.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.api import method_state
from slimtune.adapt.factors import layer_generator, reset_optimizer_entries
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import FactoredLinear, SparseDelta
from slimtune.targets import factored_layers
from slimtune.weights.precision import compute_dtype
from slimtune.weights.rank_truncation import nuclear_subgradient, spectrum
from slimtune.weights.sparse_support import (assign_support, check_support_size, extreme_entries,
                                             support_size)

STEPS = "sara/steps"


class SaRAConfig(AdapterConfig):
    """``method: sara`` -- targets, seed, fraction (of each weight's entries trained: the
    smallest by magnitude, (0, 1)), rank_weight (λ of the nuclear-norm loss, >= 0), reselect_at
    (the fraction of the run after which the support is re-selected once, (0, 1); null: never);
    r, alpha and rslora are ignored."""

    method: Literal["sara"] = "sara"
    fraction: float = Field(0.1, gt=0, lt=1)
    rank_weight: float = Field(5e-4, ge=0)
    reselect_at: float | None = Field(0.5, gt=0, lt=1)


def check_layer(config: SaRAConfig, name: str, linear: nn.Linear) -> None:
    check_support_size("sara", "fraction", config.fraction, name, tuple(linear.weight.shape))


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: SaRAConfig, prepared=None):
    check_layer(config, name, linear)
    W = linear.weight
    k = support_size(config.fraction, *W.shape)
    indices = extreme_entries(W.abs(), k, largest=False)
    sparse = SparseDelta(tuple(W.shape), indices, torch.zeros(k, dtype=W.dtype, device=W.device))
    return FactoredLinear.from_linear(linear, sparse=sparse)


def _layers(model: nn.Module) -> dict[str, FactoredLinear]:
    return {n: layer for n, layer in factored_layers(model).items() if not layer.merged}


def penalised_layer(model: nn.Module, config: SaRAConfig) -> str:
    """The layer whose update pays the nuclear norm this step (seeded by ``(seed, step)``)."""
    names = list(_layers(model))
    if not names:
        raise ValueError("sara: the model has no adapted layers")
    g = layer_generator(config.seed, f"sara/{method_state(model).get(STEPS, 0)}")
    return names[int(torch.randint(len(names), (1,), generator=g))]


def nuclear_norm_loss(model: nn.Module, config: SaRAConfig) -> torch.Tensor:
    """``λ·<U_k·V_kᵀ, P_l>`` of this step's layer: the value ``λ·||P_l||_*`` and its gradient
    ``λ·U_k·V_kᵀ`` (k: the non-zero singular values; 0 at P = 0)."""
    sparse = _layers(model)[penalised_layer(model, config)].sparse
    P = sparse.delta_weight()
    if config.rank_weight == 0:
        return P.sum() * 0
    with torch.no_grad():
        G = nuclear_subgradient(*spectrum(P))
    return config.rank_weight * (G.to(P.dtype) * P).sum()


@torch.no_grad()
def reselect(layer: FactoredLinear, optimizer=None) -> None:
    """The progressive adjustment (see the module docstring): merge, re-select, reset."""
    sparse, weight = layer.sparse, layer.base.weight
    dtype = compute_dtype(weight)
    current = weight.to(dtype) + sparse.delta_weight().to(dtype)
    support = extreme_entries(current.abs(), sparse.nnz, largest=False)
    indices, changed = assign_support(sparse.indices, support)
    origin = SparseDelta(sparse.shape, sparse.indices[changed].clone(),
                         -sparse.values[changed].detach().clone(), trainable=False)
    weight.data = (weight.to(dtype) - origin.delta_weight().to(dtype)).to(weight.dtype)
    layer.origin = origin
    sparse.indices.copy_(indices)
    sparse.values[changed] = 0
    reset_optimizer_entries(optimizer, sparse.values, changed)


def after_step(model: nn.Module, config: SaRAConfig, step: int, optimizer=None) -> None:
    """Count the step (the nuclear norm's draw reads it); re-select once at its step."""
    state = method_state(model)
    state[STEPS] = step
    total = state.get("total_steps")
    if config.reselect_at is None or total is None:
        return
    if step == max(1, int(config.reselect_at * total)):
        for layer in _layers(model).values():
            if layer.origin is None:  # re-selected once
                reselect(layer, optimizer)


METHODS.register("sara", SaRAConfig, init_layer=init_layer, check_layer=check_layer,
                 loss=nuclear_norm_loss, after_step=after_step)
