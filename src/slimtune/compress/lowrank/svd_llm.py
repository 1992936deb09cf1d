"""SVD-LLM: truncation-aware data whitening (Wang et al. 2024, "SVD-LLM: Truncation-aware Singular
Value Decomposition for Large Language Model Compression").

With ``S`` the Cholesky factor of the calibration inputs' Gram matrix (``S S^T = X^T X``)::

    W S = U Sigma V^T      B = U_k Sigma_k^{1/2}      A = Sigma_k^{1/2} V_k^T S^-1

and because ``S^-1 X^T`` has orthonormal rows the calibration loss of truncation is exactly the
dropped spectrum: ``||(W - W_k) X^T||_F^2 = ||(W - W_k) S||_F^2 = sum_{i>k} sigma_i^2``. The
authors report LLaMA-7B WikiText-2 perplexity 7.94 / 13.73 / 66.62 at 20 / 40 / 60% removed
(ratio 0.8 / 0.6 / 0.4; whitening only, no LoRA update; dense 5.68).

Deliberate differences: the Gram matrix is damped, ``X^T X + damp * mean(diag) * I`` (relative,
default ``damp = 1e-4``; ``0`` is the paper's undamped factor), and
:func:`slimtune.weights.svd.whitening_factor` raises the damping and finally falls back to a
clamped eigen-decomposition when the Cholesky fails (the reference code shifts the eigenvalues).
The whitening and the SVD of ``W S`` run in float64; the factors are stored in the weight's dtype.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from slimtune.compress.lowrank.steps import build_step, input_gram
from slimtune.compress.lowrank.config import LowRankConfig
from slimtune.compress.registry import METHODS
from slimtune.weights.svd import scaled_svd, whitening_factor

NEEDS = frozenset({"gram"})


class SVDLLMConfig(LowRankConfig):
    """``method: svd_llm`` -- fields: targets, ratio, allocation, candidates, svd, damp."""

    method: Literal["svd_llm"] = "svd_llm"
    damp: float = Field(1e-4, strict=True, description="relative damping of X^T X before the "
                        "Cholesky: + damp * mean(diag(X^T X)) * I (0 = undamped, as the paper)")

    @field_validator("damp")
    @classmethod
    def _damp(cls, v):
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v


def whitened_factors(W: Tensor, gram: Tensor, damp: float = 1e-4, rank: int | None = None,
                     svd: str = "exact"):
    """``(U, Sigma, V^T S^-1)`` from the SVD of ``W S``, ``S = chol(X^T X + damping)`` (float64)."""
    if gram.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"svd_llm: Gram shape {tuple(gram.shape)} does not match the weight's "
                         f"{W.shape[1]} inputs")
    L = whitening_factor(gram.to(W.device), damp=damp)
    r = min(W.shape) if rank is None else rank
    method = "exact" if rank is None else svd
    return scaled_svd(W.detach().to(torch.float64), L, r, kind="cholesky", method=method)


def build(config: SVDLLMConfig):
    return build_step("svd_llm", config, NEEDS, lambda W, stats, rank: whitened_factors(
        W, input_gram(stats, "svd_llm"), config.damp, rank, config.svd))


METHODS.register("svd_llm", SVDLLMConfig, build=build)
