"""LOST (Li et al. 2025, "LOST: Low-rank and Sparse Pre-training for Large Language Models",
arXiv 2508.02668).

The weight is split once, at initialisation, by its SVD into a low-rank part made of the dominant
singular components and a channel-wise sparse part built from the remaining ones; both train
jointly from there (no later SVD). The authors report LLaMA 60M-7B pretraining "competitive or
superior" to full rank at much lower memory (e.g. LLaMA-1B perplexity 15.02 against 15.56 for
full-rank training, as summarised on alphaXiv).

The split implemented here (exact SVD by default)::

    W = U·Σ·Vᵀ
    s·B·A = U_r·Σ_r·V_rᵀ            B = U_r·sqrt(Σ_r/s), A = sqrt(Σ_r/s)·V_rᵀ, s = alpha/r
    R = W - s·B·A                   the remaining components Σ_{i>r} σ_i·u_i·v_iᵀ
    I = the k = ⌊density·in⌋ input channels (columns j) with the largest ‖R[:, j]‖₂
    S = R[:, I]                     every row of those columns: trainable values, fixed support

``keep_base: false`` (default, the paper's pretraining setting): the layer has no base and starts
at ``s·B·A + S`` (R outside the channels I is dropped, so the output is not the base model's).
``keep_base: true`` (a fine-tuning variant, not in the paper): the frozen base is ``R`` with the
channels I masked out (the layer's base mask) and ``s·B·A`` is recorded as the layer's ``origin``,
so ``R⊙M + s·B·A + S = W`` and the output at step 0 is the base model's exactly; saving stores the
origin and the mask, and loading rebuilds the base from a fresh weight.

Deliberate differences. The paper's method section and code could not be read from here; the
split above follows its abstract and the OpenReview reviews of the submission (channels chosen
by the L2 norm of the columns of the residual singular subspace, a static column mask, SVD only at
initialisation). LOST's layer combines the two paths with a coefficient γ,
``γ·(low-rank path) + (1-γ)·x[:, I]·W_sᵀ``, and ablates a nonlinearity inside the low-rank path;
here the layer stays linear -- the existing ``LowRank`` and ``SparseDelta`` parts of
``FactoredLinear`` at weight 1 -- so it merges into one matrix and saves like every adapter (γ
would only rescale the two parts' initial values and effective step sizes). The default density
0.03 matches SLTrain's parameter budget; it is this project's choice, not the paper's setting.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import init_weight, top_singular
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import DenseBase, FactoredLinear, LowRank, SparseDelta
from slimtune.weights.svd import balanced_split


class LOSTConfig(AdapterConfig):
    """``method: lost`` -- r, alpha, targets, rslora, seed, density (fraction of the input
    channels in the sparse part, (0, 1]), keep_base (keep the frozen remainder as the base), svd
    (exact | gram | randomized), niter, oversample."""

    method: Literal["lost"] = "lost"
    density: float = Field(0.03, gt=0, le=1)
    keep_base: bool = False
    svd: Literal["exact", "gram", "randomized"] = "exact"
    niter: int = Field(4, ge=0)
    oversample: int = Field(10, ge=0)

    @property
    def exact_start(self) -> bool:
        return self.keep_base


def channel_count(density: float, n_in: int) -> int:
    return int(density * n_in)


def check_layer(config: LOSTConfig, name: str, linear: nn.Linear) -> None:
    if channel_count(config.density, linear.in_features) < 1:
        raise ValueError(f"lost: density={config.density:g} keeps no input channel of {name} "
                         f"({linear.in_features} channels); raise density")


def top_channels(R: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` columns of ``R`` with the largest L2 norm, in increasing order."""
    norms = torch.linalg.vector_norm(R, dim=0)
    return torch.topk(norms, k, sorted=False).indices.sort().values


def column_support(n_out: int, n_in: int, columns: torch.Tensor) -> torch.Tensor:
    """Flat indices of every row of ``columns``, row-major (as ``R[:, columns].reshape(-1)``)."""
    rows = torch.arange(n_out, device=columns.device)
    return (rows[:, None] * n_in + columns[None, :]).reshape(-1)


@torch.no_grad()
def lost_split(name: str, linear: nn.Linear, config: LOSTConfig):
    """``(A, B, R, I)`` in the weight's dtype: the low-rank factors, the remainder
    ``W - s·B·A`` (computed as ``adapted_linear`` computes a residual base) and the channels."""
    check_layer(config, name, linear)
    W = init_weight(linear, config.r, "lost")
    U, S, Vh = top_singular(linear, config.r, "lost", config.svd, config.niter,
                            config.oversample, config.seed)
    A, B = balanced_split(U, S, Vh, config.scale)
    kw = {"dtype": linear.weight.dtype, "device": linear.weight.device}
    A, B = A.to(**kw).contiguous(), B.to(**kw).contiguous()
    low = LowRank(A, B, config.scale).delta_weight().to(W.dtype)
    R = (W - low).to(kw["dtype"])
    return A, B, R, top_channels(R.to(W.dtype), channel_count(config.density, W.shape[1]))


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: LOSTConfig, prepared=None):
    A, B, R, columns = lost_split(name, linear, config)
    n_out, n_in = R.shape
    sparse = SparseDelta((n_out, n_in), column_support(n_out, n_in, columns),
                         R[:, columns].reshape(-1).clone())
    lowrank = LowRank(A.clone(), B.clone(), config.scale)
    bias = None if linear.bias is None else linear.bias.data
    if not config.keep_base:
        return FactoredLinear(n_in, n_out, lowrank=lowrank, sparse=sparse, bias=bias)
    mask = torch.ones(n_out, n_in, dtype=torch.bool, device=R.device)
    mask[:, columns] = False
    origin = LowRank(A, B, config.scale, train_A=False, train_B=False)
    return FactoredLinear(n_in, n_out, base=DenseBase(R), lowrank=lowrank, sparse=sparse,
                          mask=mask, bias=bias, origin=origin)


METHODS.register("lost", LOSTConfig, init_layer=init_layer, check_layer=check_layer)
