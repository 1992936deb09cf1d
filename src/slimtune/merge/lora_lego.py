"""LoRA-LEGO (Zhao et al. 2025, "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA
to Extremes Through Rank-Wise Clustering", ICLR 2025): every rank of every LoRA is a *minimal
semantic unit* ``[aⱼ; bⱼ]`` (row j of A, column j of B; ``ΔW = Σⱼ bⱼaⱼᵀ``, so units can be
permuted and concatenated freely). The units of all LoRAs are k-means-clustered into ``rank``
clusters and each cluster's centroid becomes one rank of the merged LoRA.

Scale (the paper's "dual reweighting" against the norm decay of averaging; this is our reading,
the exact formula was not checked against the authors' code): each unit's ``b`` carries its
model's weight ``wᵢ/Σw``; each centroid's ``a`` and ``b`` halves are rescaled to the mean norm of
their members' halves, and the centroid unit is counted once per member, so a cluster of near
copies reproduces their sum. Units are sign-normalised first (``b·aᵀ = (−b)·(−a)ᵀ``). The
clustering is seeded (``seed``): deterministic.

On dense task vectors each τᵢ is first factored by its truncated SVD at ``rank`` (units
``√σ·u``, ``√σ·v``); tensors that are not matrices merge as the weighted mean. Reported
(METHODS.md): none for this scale (the paper: better than other LoRA merges on multi-task
benchmarks).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimtune.merge.config import MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.lora_merging import kmeans, rank_one_units


class LoraLegoConfig(MergeConfig):
    example: ClassVar[dict] = {"rank": 8}
    method: Literal["lora_lego"] = "lora_lego"
    rank: int = Field(..., ge=1, description="rank of the merged LoRA (number of clusters)")
    seed: int = 0


def mean_weights(weights: torch.Tensor) -> torch.Tensor:
    if weights.sum() == 0:
        raise ValueError("lora_lego: the weights sum to 0")
    return weights / weights.sum()


def cluster_units(factors, coefficients: torch.Tensor, rank: int, generator):
    a, b = rank_one_units(factors, coefficients)
    labels = kmeans(torch.cat([a, b], dim=1), rank, generator)
    k = int(labels.max()) + 1 if labels.numel() else 0
    A = torch.zeros(k, a.shape[1], dtype=a.dtype, device=a.device)
    B = torch.zeros(b.shape[1], k, dtype=b.dtype, device=b.device)
    for c in range(k):
        members = labels == c
        n = int(members.sum())
        a_c, b_c = a[members].mean(dim=0), b[members].mean(dim=0)
        a_norm, b_norm = a[members].norm(dim=1).mean(), b[members].norm(dim=1).mean()
        A[c] = a_c * (a_norm / a_c.norm()) if a_c.norm() > 0 else a_c
        B[:, c] = n * (b_c * (b_norm / b_c.norm()) if b_c.norm() > 0 else b_c)
    return B, A


def merge_factors(factors, weights: torch.Tensor, config: LoraLegoConfig, generator=None):
    return cluster_units([(B.float(), A.float()) for B, A in factors],
                         mean_weights(weights.reshape(-1).float()), config.rank, generator)


def svd_factors(t: torch.Tensor, rank: int):
    U, S, Vh = torch.linalg.svd(t, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: LoraLegoConfig,
          generator=None, base=None) -> torch.Tensor:
    w = mean_weights(weights.reshape(-1))
    if stacked.dim() != 3:
        return (stacked * w.reshape(-1, *[1] * (stacked.dim() - 1))).sum(dim=0)
    dtype = torch.float64 if stacked.dtype == torch.float64 else torch.float32
    factors = [svd_factors(t.to(dtype), config.rank) for t in stacked]
    B, A = cluster_units(factors, w.to(dtype), config.rank, generator)
    return (B @ A).to(stacked.dtype)


MERGES.register("lora_lego", LoraLegoConfig, merge=merge, merge_factors=merge_factors)
