"""Plain truncated SVD: ``W ~= U_k Sigma_k V_k^T`` (Eckart-Young optimal in ``||.||_F``).

The baseline of every low-rank compression paper (LoRD, Kaushal et al. 2023, applies it one-shot to
code LLMs: "reduced by upto 39.58% with less than 1% increase in perplexity"). On LLaMA-7B,
WikiText-2 perplexity 20061 with 20% of the parameters removed (ratio 0.8; SVD-LLM's comparison
table, quoted in METHODS.md): the weight's own spectrum ignores which input directions the data
actually uses.

Needs no statistics. The factors are split balanced (``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) V_k^T``,
see :mod:`slimtune.compress.lowrank`). Exact SVD in float32 by default; ``svd: randomized`` uses
the Halko-Martinsson-Tropp range finder for the final rank-``k`` factors.
"""
from __future__ import annotations

from typing import Literal

from torch import Tensor

from slimtune.compress.lowrank.steps import build_step
from slimtune.compress.lowrank.config import LowRankConfig
from slimtune.compress.registry import METHODS
from slimtune.weights.svd import randomized_svd, truncated_svd

NEEDS: frozenset[str] = frozenset()


class SVDConfig(LowRankConfig):
    """``method: svd`` -- fields: targets, ratio, allocation, candidates, svd."""

    method: Literal["svd"] = "svd"


def svd_factors(W: Tensor, rank: int | None = None, svd: str = "exact"):
    """Top-``rank`` SVD of ``W`` (all components when ``rank`` is None, always exact then)."""
    full = min(W.shape)
    if rank is None or svd == "exact":
        return truncated_svd(W, full if rank is None else rank)
    return randomized_svd(W, rank)


def build(config: SVDConfig):
    return build_step("svd", config, NEEDS,
                      lambda W, stats, rank: svd_factors(W, rank, config.svd))


METHODS.register("svd", SVDConfig, build=build)
