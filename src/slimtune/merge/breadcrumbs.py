"""Model Breadcrumbs (Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model
Merging with Sparse Masks"): from each task vector drop the largest ``gamma`` fraction of entries
(outliers) and the smallest, keeping ``density`` of them
(:func:`~slimtune.weights.task_vectors.keep_magnitude_band`), then add them as task arithmetic:
``λ Σ wᵢ τ̃ᵢ``. ``tie_break`` orders entries of equal magnitude at the band's two edges:
``index`` (default) by position, so a tensor too large for memory is streamed in ranges of rows
with the same result (hook ``stream``: two exact top-k masks per model); ``peer`` as mergekit's
ascending ``torch.sort`` (an unstable sort of the whole tensor, so such a tensor is then merged
whole). Equal to mergekit 0.1.5's ``breadcrumbs`` with ``tie_break: peer`` (tests). Reported
(METHODS.md): none for this scale.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimtune.merge.config import Density, Lambda, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.magnitude_threshold import TopMagnitudeMask
from slimtune.weights.task_vectors import band_sizes, keep_magnitude_band


class BreadcrumbsConfig(MergeConfig):
    example: ClassVar[dict] = {"density": 0.5, "gamma": 0.05}
    method: Literal["breadcrumbs"] = "breadcrumbs"
    density: float = Density
    gamma: float = Field(0.01, ge=0, lt=1, description="fraction of largest entries dropped")
    lambda_: float = Lambda
    tie_break: Literal["index", "peer"] = "index"


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: BreadcrumbsConfig,
          generator=None, base=None) -> torch.Tensor:
    order = "sort" if config.tie_break == "peer" else "index"
    kept = torch.stack([keep_magnitude_band(t, config.density, config.gamma, order)
                        for t in stacked])
    return config.lambda_ * (kept * weights).sum(dim=0)


class BreadcrumbsStream:
    """The band of each model as its top ``outliers + keep`` minus its top ``outliers``."""

    def __init__(self, config: BreadcrumbsConfig, weights: torch.Tensor, shape: tuple[int, ...]):
        n = math.prod(shape)
        top, keep = band_sizes(n, config.density, config.gamma)
        self.edges = [(TopMagnitudeMask(n, top + keep), TopMagnitudeMask(n, top))
                      for _ in range(weights.shape[0])]
        self.config, self.weights, self.passes = config, weights, 0
        self.whole = config.density >= 1

    def wants_pass(self) -> bool:
        return self.passes < 2

    def observe(self, stacked: torch.Tensor, base: torch.Tensor) -> None:
        for edges, t in zip(self.edges, stacked):
            for edge in edges:
                edge.count(t)

    def end_pass(self) -> None:
        self.passes += 1
        for edges in self.edges:
            for edge in edges:
                edge.next_pass()
        if self.passes == 2 and self.config.tie_break == "peer":
            self.whole = any(e.straddles and e.threshold != 0 for es in self.edges for e in es)

    def merge_rows(self, stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        for (upto_band, outliers), t in zip(self.edges, stacked):
            t *= upto_band.mask(t) & ~outliers.mask(t)
        return self.config.lambda_ * (stacked * self.weights).sum(dim=0)


MERGES.register("breadcrumbs", BreadcrumbsConfig, merge=merge,
                stream=lambda config, weights, shape, generator=None:
                BreadcrumbsStream(config, weights, shape))
