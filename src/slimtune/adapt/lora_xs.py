"""LoRA-XS (Bałazy et al. 2024, "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
Parameters").

    ΔW = s·B·R·A,   B = U_r·diag(S_r),  A = V_rᵀ   (frozen, the top-r SVD of W),  R [r, r]

Only the r × r matrix R between the frozen singular factors trains: r² numbers per layer, whatever
the layer's size (LoRA trains r·(in + out)). R starts at 0, so the output at step 0 is the base
model's and the base stays W itself (the paper draws R from a small Gaussian; 0 keeps the start
exact and its gradient Bᵀ·G·Aᵀ is not zero). s = alpha / r as LoRA. The paper reports accuracy on
GLUE and GSM8K/MATH on par with or above LoRA and VeRA with over 100x fewer trainable parameters
than LoRA at 7B scale.

The frozen factors are saved with the adapter: recomputing them at load would need the same SVD
to the last bit (a sign flip of a singular pair changes what R means).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear, top_singular
from slimtune.adapt.registry import METHODS, AdapterConfig


class LoRAXSConfig(AdapterConfig):
    """``method: lora_xs`` -- r, alpha, targets, rslora, seed, svd (exact | gram | randomized),
    niter, oversample."""

    method: Literal["lora_xs"] = "lora_xs"
    svd: Literal["exact", "gram", "randomized"] = "randomized"
    niter: int = Field(4, ge=0)
    oversample: int = Field(10, ge=0)


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: LoRAXSConfig, prepared=None):
    U, S, Vh = top_singular(linear, config.r, "lora_xs", config.svd, config.niter,
                            config.oversample, config.seed)
    R = torch.zeros(config.r, config.r, dtype=U.dtype, device=U.device)
    return adapted_linear(linear, Vh, U * S, config.scale, core=R, train_A=False, train_B=False,
                          train_core=True)


METHODS.register("lora_xs", LoRAXSConfig, init_layer=init_layer)
