"""Linear merge (weight averaging; "model soups", Wortsman et al. 2022): the weighted mean of the
models, i.e. of their task vectors, ``Σ wᵢ τᵢ / Σ wᵢ`` (``normalize: false``: ``Σ wᵢ τᵢ``), as
mergekit's ``linear`` (which averages the weights themselves: the same up to rounding, since
Σ wᵢ (W_base + τᵢ) / Σ wᵢ = W_base + Σ wᵢ τᵢ / Σ wᵢ). On LoRA adapters it merges without
densifying, by stacking: ``Σ wᵢ BᵢAᵢ / Σ wᵢ = [c₁B₁, …, cₖBₖ]·[A₁; …; Aₖ]`` with ``cᵢ = wᵢ / Σ w``
(exact; rank Σ rᵢ; PEFT's ``add_weighted_adapter(combination_type="cat")`` is the same stacking)."""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from slimtune.merge.config import MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.lora_merging import stack_factors


class LinearConfig(MergeConfig):
    example: ClassVar[dict] = {}
    method: Literal["linear"] = "linear"
    normalize: bool = True


def coefficients(weights: torch.Tensor, config: LinearConfig) -> torch.Tensor:
    if not config.normalize:
        return weights
    norm = weights.sum()
    if norm == 0:
        raise ValueError("linear: the weights sum to 0; set normalize: false or change them")
    return weights / norm


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: LinearConfig,
          generator=None, base=None) -> torch.Tensor:
    return (stacked * coefficients(weights, config)).sum(dim=0)


def merge_factors(factors, weights: torch.Tensor, config: LinearConfig, generator=None):
    return stack_factors(factors, coefficients(weights, config))


MERGES.register("linear", LinearConfig, merge=merge, merge_factors=merge_factors,
                elementwise=lambda config: True)
