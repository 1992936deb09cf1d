"""SVFit (Sun et al. 2024, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models
Using Singular Values").

    W = U·S·Vᵀ;   W' = W_base + U_r·diag(σ)·V_rᵀ,   σ = S_r at init (trainable),
    W_base = W - U_r·diag(S_r)·V_rᵀ   (frozen), U_r, V_r frozen

The top-r singular vectors are frozen bases and only the r singular values train, so a layer
trains r numbers (LoRA trains r·(in + out)); the output at step 0 equals the original model's.
The paper reports SVFit outperforming LoRA "while requiring 16 times fewer trainable parameters"
on language, text-to-image and image-classification tasks.

The singular values carry the scale of the update, so the low-rank scale is 1: ``alpha`` and
``rslora`` are accepted (shared config fields) but not used. ``svd: randomized`` (default) uses
:func:`slimtune.weights.svd.randomized_svd` (``niter`` power iterations, ``seed``); ``svd: exact``
the full SVD. Either way the base is W minus the very factors kept, so the start is exact.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear, top_singular
from slimtune.adapt.registry import METHODS, AdapterConfig


class SVFitConfig(AdapterConfig):
    """``method: svfit`` -- r, targets, seed, svd (exact | gram | randomized), niter,
    oversample; alpha and rslora
    are ignored (the trained singular values set the scale)."""

    method: Literal["svfit"] = "svfit"
    svd: Literal["exact", "gram", "randomized"] = "randomized"
    niter: int = Field(4, ge=0)
    oversample: int = Field(10, ge=0)


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: SVFitConfig, prepared=None):
    U, S, Vh = top_singular(linear, config.r, "svfit", config.svd, config.niter,
                            config.oversample, config.seed)
    return adapted_linear(linear, Vh, U, 1.0, core=S, residual=True, train_A=False,
                          train_B=False, train_core=True)


METHODS.register("svfit", SVFitConfig, init_layer=init_layer)
