"""SST, Sparse Spectral Training (Zhao et al. 2024, "Sparse Spectral Training and Inference on
Euclidean and Hyperbolic Neural Networks", arXiv 2405.15481).

    W = U·diag(σ)·Vᵀ   (the thin SVD of the weight: all m = min(out, in) components)
    every step:         all σ train; only r pairs (u_i, v_i) receive gradient
    every T steps:      re-SVD  U·diag(σ)·Vᵀ = U'·diag(σ')·V'ᵀ  (same product, orthonormal U', V'),
                        then draw r new pairs, i ~ multinomial(σ') without replacement

The layer has no base: it is ``LowRank(A = Vᵀ, B = U, core = σ, scale 1)`` and starts at the
weight itself (up to round-off), so the output at step 0 is the base model's. The authors report
that on OPT-125M, with rank 8.3% of the embedding dimension, SST "reduces the perplexity gap to
full-rank training by 67.6%" (97.4% on LLaMA-1.3B in the revised version).

How "only sampled pairs update" is done: the low-rank part's ``grad_scale`` buffer (one number per
component; ``LowRank.factors``) multiplies the gradient reaching u_i and v_i by 0 for unsampled
pairs -- the values are untouched and the optimiser sees one ordinary parameter per factor. With
``enhanced_gradient`` (default) a sampled pair's scale is 1/σ_i, the paper's enhanced gradient
(∂L/∂u_i = (∂L/∂W)·v_i instead of (∂L/∂W)·v_i·σ_i), with σ_i as of the last re-SVD (held for the
window; floored at 1e-6·max σ). The buffer is saved with the adapter, so a resumed run continues
with the same pairs. Sampling is deterministic: the generator is seeded by (seed, layer name,
step), and re-sampling happens after optimiser step T, 2T, ... (the method's ``after_step``).

Differences from the paper. Its memory-efficient implementation trains the sampled vectors as
separate parameters with their own optimiser state; here U and V are whole parameters, so an
optimiser's decoupled weight decay also shrinks unsampled vectors (train with weight_decay 0 to
keep them fixed) and a pair dropped at re-sampling still moves on its decaying momentum until that
dies out. The paper re-initialises by SVD per round; here every re-sampling re-orthogonalises
(``update_every``, default 200, is this project's choice). ``alpha`` and ``rslora`` are accepted
but not used (the singular values carry the scale).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import init_weight, layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import FactoredLinear, LowRank
from slimtune.targets import factored_layers


class SSTConfig(AdapterConfig):
    """``method: sst`` -- r (singular-vector pairs updated at a time), targets, seed,
    update_every (steps between re-SVD and re-sampling, >= 1), enhanced_gradient (scale a sampled
    pair's gradient by 1/σ_i); alpha and rslora are ignored (scale 1)."""

    method: Literal["sst"] = "sst"
    update_every: int = Field(200, ge=1)
    enhanced_gradient: bool = True


def sample_pairs(sigma: torch.Tensor, r: int, seed: int, name: str, step: int) -> torch.Tensor:
    """``r`` distinct component indices drawn with probability ∝ σ (sorted), from a generator
    seeded by ``(seed, name, step)``. Zero singular values are drawn only when fewer than ``r``
    are positive."""
    weights = sigma.detach().double().cpu().clamp_min(0)
    if int((weights > 0).sum()) < r:
        weights = weights + weights.max().clamp_min(1.0) * 1e-12
    g = layer_generator(seed, f"{name}/sst/{step}")
    return torch.multinomial(weights, r, replacement=False, generator=g).sort().values


def pair_scale(sigma: torch.Tensor, pairs: torch.Tensor, enhanced: bool) -> torch.Tensor:
    """The ``grad_scale`` vector: 0 for unsampled pairs; 1 or 1/σ_i (enhanced) for sampled."""
    sigma = sigma.detach().double().cpu()
    scale = torch.zeros_like(sigma)
    chosen = sigma[pairs].clamp_min(float(sigma.max()) * 1e-6 + 1e-30)
    scale[pairs] = 1.0 / chosen if enhanced else 1.0
    return scale


@torch.no_grad()
def spectral_layer(name: str, linear: nn.Linear, config: SSTConfig) -> FactoredLinear:
    W = init_weight(linear, config.r, "sst").double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    pairs = sample_pairs(S, config.r, config.seed, name, 0)
    kw = {"dtype": linear.weight.dtype, "device": linear.weight.device}
    lowrank = LowRank(Vh.to(**kw).contiguous(), U.to(**kw).contiguous(), 1.0, S.to(**kw),
                      grad_scale=pair_scale(S, pairs, config.enhanced_gradient).to(**kw))
    bias = None if linear.bias is None else linear.bias.data
    return FactoredLinear(linear.in_features, linear.out_features, lowrank=lowrank, bias=bias)


def init_layer(name: str, linear: nn.Linear, config: SSTConfig, prepared=None):
    return spectral_layer(name, linear, config)


@torch.no_grad()
def resample(name: str, layer: FactoredLinear, config: SSTConfig, step: int) -> None:
    """Re-orthogonalise the layer (SVD of its own product, in float64, written back in place so
    the optimiser keeps the same parameters) and draw the pairs for the next window."""
    lr = layer.lowrank
    product = (lr.B.double() * lr.core.double()) @ lr.A.double()
    U, S, Vh = torch.linalg.svd(product, full_matrices=False)
    lr.A.copy_(Vh)
    lr.B.copy_(U)
    lr.core.copy_(S)
    pairs = sample_pairs(S, config.r, config.seed, name, step)
    lr.grad_scale.copy_(pair_scale(S, pairs, config.enhanced_gradient))


def after_step(model: nn.Module, config: SSTConfig, step: int, optimizer=None) -> None:
    """After optimiser step ``step`` (1 after the first): re-SVD and re-sample every
    ``update_every`` steps."""
    if step <= 0 or step % config.update_every:
        return
    for name, layer in factored_layers(model).items():
        if not layer.merged:
            resample(name, layer, config, step)


METHODS.register("sst", SSTConfig, init_layer=init_layer, after_step=after_step)
