"""PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
Large Language Models").

    W = U·S·Vᵀ;   A = sqrt(S_r/s)·V_rᵀ,  B = U_r·sqrt(S_r/s);   W_base = W - s·B·A

The adapter starts as the principal rank-r part of W (trainable) and the frozen base is the
residual, so the output at step 0 equals the original model's. The paper reports faster
convergence than LoRA and higher accuracy at equal rank (e.g. Mistral-7B GSM8K 72.86 vs 67.7).

``svd: randomized`` (default) uses :func:`slimtune.weights.svd.randomized_svd` with ``niter``
power iterations, a sketch of ``r + oversample`` columns and a fixed seed (``oversample: 0`` is
PEFT's ``pissa_niter_N`` sketch); ``svd: exact`` the full LAPACK SVD (PEFT's ``pissa``);
``svd: gram`` the same exact triplets from ``eigh`` of the float64 Gram matrix, faster and more
accurate. BENCHMARKS.md records all of them against PEFT's ``pissa`` and ``pissa_niter_4``.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear, top_singular
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.weights.svd import balanced_split


class PiSSAConfig(AdapterConfig):
    """``method: pissa`` -- r, alpha, targets, rslora, seed, svd (exact | gram | randomized), niter,
    oversample."""

    method: Literal["pissa"] = "pissa"
    svd: Literal["exact", "gram", "randomized"] = "randomized"
    niter: int = Field(4, ge=0)
    oversample: int = Field(10, ge=0)


def init_layer(name: str, linear: nn.Linear, config: PiSSAConfig, prepared=None):
    U, S, Vh = top_singular(linear, config.r, "pissa", config.svd, config.niter, config.oversample,
                            config.seed)
    A, B = balanced_split(U, S, Vh, config.scale)
    return adapted_linear(linear, A, B, config.scale, residual=True)


METHODS.register("pissa", PiSSAConfig, init_layer=init_layer)
