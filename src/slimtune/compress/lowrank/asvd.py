"""ASVD: activation-aware SVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value
Decomposition for Compressing Large Language Models").

Input channels that carry large activations matter more, so the columns of ``W [out, in]`` are
scaled before the SVD and unscaled after::

    S = diag(mean_t |x_tj|) ** alpha      W S = U Sigma V^T      W_k = U_k Sigma_k (V_k^T S^-1)

(``scaled_svd(kind="diag")``), minimising ``||(W - W_k) S||_F``. Reported (SVD-LLM's comparison
table, as quoted in METHODS.md): LLaMA-7B WikiText-2 perplexity 11.14 at 20% removed (ratio 0.8),
against 20061 for plain SVD. ``alpha = 0.5`` is ASVD's default.

Deliberate differences: ASVD searches per-layer ratios by perplexity sensitivity; here that is
``allocation: sensitivity`` on the calibration-loss curves (:mod:`.allocation`), and the default is
``uniform``. Scales are clamped below at ``1e-6`` times their maximum (and ``1e-12`` absolute),
so dead input channels do not divide by zero. The SVD runs in float32 (float64 for a float64
weight).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from slimtune.compress.lowrank.steps import build_step, input_mean_abs
from slimtune.compress.lowrank.config import LowRankConfig
from slimtune.compress.registry import METHODS
from slimtune.weights.precision import compute_dtype
from slimtune.weights.svd import scaled_svd

NEEDS = frozenset({"mean_abs"})
SCALE_FLOOR = 1e-6  # relative to the largest channel scale


class ASVDConfig(LowRankConfig):
    """``method: asvd`` -- fields: targets, ratio, allocation, candidates, svd, alpha."""

    method: Literal["asvd"] = "asvd"
    alpha: float = Field(0.5, strict=True, description="exponent of the activation scaling "
                         "S = diag(mean|x|)**alpha (0 gives plain SVD; ASVD's default 0.5)")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        if not 0 <= v <= 4:
            raise ValueError(f"must be in [0, 4], got {v}")
        return v


def activation_scale(mean_abs: Tensor, alpha: float) -> Tensor:
    """``mean|x| ** alpha`` per input channel, clamped away from zero (float64)."""
    s = mean_abs.detach().to(torch.float64).clamp_min(0) ** alpha
    top = float(s.max()) if s.numel() else 0.0
    floor = max(SCALE_FLOOR * top, 1e-12)
    return s.clamp_min(floor)


def activation_aware_factors(W: Tensor, mean_abs: Tensor, alpha: float, rank: int | None = None,
                             svd: str = "exact"):
    """``(U, S, Vh S^-1)`` from the SVD of ``W diag(mean|x|)**alpha``."""
    dtype = compute_dtype(W)
    scale = activation_scale(mean_abs, alpha).to(device=W.device, dtype=dtype)
    r = min(W.shape) if rank is None else rank
    method = "exact" if rank is None else svd
    return scaled_svd(W.detach().to(dtype), scale, r, kind="diag", method=method)


def build(config: ASVDConfig):
    return build_step("asvd", config, NEEDS, lambda W, stats, rank: activation_aware_factors(
        W, input_mean_abs(stats, "asvd"), config.alpha, rank, config.svd))


METHODS.register("asvd", ASVDConfig, build=build)
