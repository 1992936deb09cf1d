"""Linear merge (weight averaging; "model soups", Wortsman et al. 2022): the weighted mean of the
models, i.e. of their task vectors, ``Σ wᵢ τᵢ / Σ wᵢ`` (``normalize: false``: ``Σ wᵢ τᵢ``), as
mergekit's ``linear`` (which averages the weights themselves: the same up to rounding, since
Σ wᵢ (W_base + τᵢ) / Σ wᵢ = W_base + Σ wᵢ τᵢ / Σ wᵢ)."""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from slimtune.merge.config import MergeConfig
from slimtune.merge.registry import MERGES


class LinearConfig(MergeConfig):
    example: ClassVar[dict] = {}
    method: Literal["linear"] = "linear"
    normalize: bool = True


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: LinearConfig,
          generator=None, base=None) -> torch.Tensor:
    total = (stacked * weights).sum(dim=0)
    if not config.normalize:
        return total
    norm = weights.sum()
    if norm == 0:
        raise ValueError("linear: the weights sum to 0; set normalize: false or change them")
    return total / norm


MERGES.register("linear", LinearConfig, merge=merge)
