"""Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks"): from each task vector drop the largest ``gamma`` fraction of entries
(outliers) and the smallest, keeping ``density`` of them
(:func:`~slimtune.weights.task_vectors.keep_magnitude_band`), then add them as task arithmetic:
``λ Σ wᵢ τ̃ᵢ``. Equal to mergekit 0.1.5's ``breadcrumbs`` (tests). Reported (METHODS.md): none
for this scale.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimtune.merge.config import Density, Lambda, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.task_vectors import keep_magnitude_band


class BreadcrumbsConfig(MergeConfig):
    example: ClassVar[dict] = {"density": 0.5, "gamma": 0.05}
    method: Literal["breadcrumbs"] = "breadcrumbs"
    density: float = Density
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of largest entries dropped")
    lambda_: float = Lambda


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: BreadcrumbsConfig,
          generator=None, base=None) -> torch.Tensor:
    kept = torch.stack([keep_magnitude_band(t, config.density, config.gamma) for t in stacked])
    return config.lambda_ * (kept * weights).sum(dim=0)


MERGES.register("breadcrumbs", BreadcrumbsConfig, merge=merge)
