"""SORSA (Cao 2024, "SORSA: Singular Values and Orthonormal Regularized Singular Vectors
Adaptation of Large Language Models").

    W = U·S·Vᵀ;   W' = W_base + U_p·diag(σ_p)·V_pᵀ,   U_p, σ_p, V_p: top-r SVD, trainable
    W_base = W - U_p·diag(S_p)·V_pᵀ   (frozen residual)
    loss += gamma · Σ_layers ( ||U_pᵀU_p - I||²_F + ||V_pᵀV_p - I||²_F )

PiSSA's split with the principal part kept in SVD form (B = U_p, diagonal core σ_p, A = V_pᵀ, all
trainable, scale 1) and an orthonormal regulariser that keeps U_p, V_p close to orthonormal so the
scaling moves into σ_p. The regulariser is zero at init; it is this method's registered ``loss``
(:func:`slimtune.adapt.extra_loss`), added to the task loss by the training loop. The paper
applies its gradient with its own step size gamma; as a loss term its step is the optimiser's
(exact for SGD with lr 1, rescaled by Adam). ``gamma`` defaults to 4e-4, the value of the reference
training script (scripts/train_sorsa.sh in Gunale0926/SORSA). The reference code sums
(non-squared) Frobenius norms averaged over matrices; this follows the paper's squared form.

The paper reports Llama-2-7B GSM-8K 56.03 (PiSSA 53.07, LoRA 42.30) and MATH 10.36 (PiSSA 7.44,
LoRA 5.50). ``alpha`` and ``rslora`` are accepted but not used (scale 1, as SVFit).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear, top_singular
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.targets import factored_layers
from slimtune.weights.precision import compute_dtype


class SORSAConfig(AdapterConfig):
    """``method: sorsa`` -- r, targets, seed, gamma (regulariser weight, >= 0), svd (exact |
    gram | randomized), niter, oversample; alpha and rslora are ignored (scale 1)."""

    method: Literal["sorsa"] = "sorsa"
    gamma: float = Field(4e-4, ge=0)
    svd: Literal["exact", "gram", "randomized"] = "randomized"
    niter: int = Field(4, ge=0)
    oversample: int = Field(10, ge=0)


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: SORSAConfig, prepared=None):
    U, S, Vh = top_singular(linear, config.r, "sorsa", config.svd, config.niter,
                            config.oversample, config.seed)
    return adapted_linear(linear, Vh, U, 1.0, core=S, residual=True)


def orthonormal_penalty(M: torch.Tensor) -> torch.Tensor:
    """``||MᵀM - I||²_F`` for a tall ``M [n, r]`` (computed in float32 or float64)."""
    M = M.to(compute_dtype(M))
    gram = M.mT @ M
    return (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).square().sum()


def orthonormal_loss(model: nn.Module, config: SORSAConfig) -> torch.Tensor:
    """``gamma · Σ (||U_pᵀU_p - I||²_F + ||V_pᵀV_p - I||²_F)`` over the adapted layers."""
    terms = [orthonormal_penalty(layer.lowrank.B) + orthonormal_penalty(layer.lowrank.A.mT)
             for layer in factored_layers(model).values()]
    if not terms:
        raise ValueError("sorsa: the model has no adapted layers")
    return config.gamma * torch.stack(terms).sum()


METHODS.register("sorsa", SORSAConfig, init_layer=init_layer, loss=orthonormal_loss)
