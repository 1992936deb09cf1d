"""MiLoRA (Wang et al. 2024, "MiLoRA: Harnessing Minor Singular Components for
Parameter-Efficient LLM Finetuning").

    W = U·S·Vᵀ;   A = sqrt(S_min/s)·V_minᵀ,  B = U_min·sqrt(S_min/s);   W_base = W - s·B·A

PiSSA's construction on the other end of the spectrum: the adapter starts as the r *minor*
singular components (smallest singular values), the frozen base keeps the principal part (the
pre-trained knowledge), and the output at step 0 equals the original model's. The paper reports
gains over LoRA and PiSSA on commonsense reasoning, math reasoning and instruction following
(LLaMA-2-7B, LLaMA-3-8B); METHODS.md lists no number.

The tail of the spectrum needs the exact SVD: a randomized range finder (as PiSSA's default)
captures the dominant subspace and never the minor one, so this method always runs the full
``torch.linalg.svd`` (in float32, float64 for float64 weights) -- noticeably slower than PiSSA's
randomized init on large layers.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from slimtune.adapt.factors import adapted_linear, init_weight
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.weights.svd import balanced_split, truncated_svd


class MiLoRAConfig(AdapterConfig):
    """``method: milora`` -- r, alpha, targets, rslora, seed (unused: the SVD is exact)."""

    method: Literal["milora"] = "milora"


def minor_factors(linear: nn.Linear, r: int):
    """``(U_min [out, r], S_min [r], Vh_min [r, in])``: the r smallest singular triplets."""
    W = init_weight(linear, r, "milora")
    U, S, Vh = truncated_svd(W, min(W.shape))  # the full thin SVD, deterministic signs
    return U[:, -r:], S[-r:], Vh[-r:]


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: MiLoRAConfig, prepared=None):
    U, S, Vh = minor_factors(linear, config.r)
    A, B = balanced_split(U, S, Vh, config.scale)
    return adapted_linear(linear, A, B, config.scale, residual=True)


METHODS.register("milora", MiLoRAConfig, init_layer=init_layer)
