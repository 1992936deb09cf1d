"""FLoRA stacking (Wang et al. 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations"): LoRA updates of *different ranks* are aggregated exactly by
stacking, ``B = [p₁B₁, …, pₖBₖ]``, ``A = [A₁; …; Aₖ]``, so ``B·A = Σ pᵢ BᵢAᵢ`` with rank ``Σ rᵢ``
(no cross terms, unlike averaging A's and B's separately), ``pᵢ = wᵢ / Σ w`` (the paper's
data-size weights; ``normalize: false`` uses ``wᵢ`` as they are). On dense task vectors the same
sum, ``Σ pᵢ τᵢ``, is computed directly (what stacking the factors gives). Reported (METHODS.md):
none for this scale; the paper's point is exactness across heterogeneous ranks (tested).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from slimtune.merge.config import MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.lora_merging import stack_factors


class FloraConfig(MergeConfig):
    example: ClassVar[dict] = {}
    method: Literal["flora"] = "flora"
    normalize: bool = True


def coefficients(weights: torch.Tensor, config: FloraConfig) -> torch.Tensor:
    if config.normalize and weights.sum() == 0:
        raise ValueError("flora: the weights sum to 0; set normalize: false or change them")
    return weights / weights.sum() if config.normalize else weights


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: FloraConfig, generator=None,
          base=None) -> torch.Tensor:
    return (stacked * coefficients(weights, config)).sum(dim=0)


def merge_factors(factors, weights: torch.Tensor, config: FloraConfig, generator=None):
    return stack_factors(factors, coefficients(weights, config))


MERGES.register("flora", FloraConfig, merge=merge, merge_factors=merge_factors,
                elementwise=lambda config: True)
