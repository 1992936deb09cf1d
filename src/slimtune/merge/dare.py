"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch"): drop each entry of each task vector with probability 1 − ``density``,
rescale what is kept, then merge ``linear`` (λ Σ wᵢ τ̃ᵢ, PEFT's ``dare_linear``) or ``ties``
(elect + disjoint merge as in :mod:`slimtune.merge.ties`, PEFT's ``dare_ties``).

``rescale: inverse`` divides by ``density`` (the paper: each entry's expectation is unchanged);
``l1`` matches the kept entries' L1 norm to the undropped vector's (mergekit's ``rescale``). The
masks come from a ``torch.Generator`` seeded with ``seed``, drawn task by task with
``torch.bernoulli`` (so the same seed gives PEFT's and mergekit's masks after
``torch.manual_seed(seed)``). With ``then: ties``, ``normalize`` (default false, as mergekit's
``dare_ties``) divides the agreeing entries as :mod:`slimtune.merge.ties` does; PEFT's
``dare_ties`` is ``convention: peft, normalize: true``.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from slimtune.merge.config import Convention, Density, Lambda, Majority, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.task_vectors import bernoulli_mask, elect_and_merge, rescale_kept


class DareConfig(MergeConfig):
    example: ClassVar[dict] = {"density": 0.5, "seed": 1}
    method: Literal["dare"] = "dare"
    density: float = Density
    rescale: Literal["inverse", "l1"] = "inverse"
    then: Literal["linear", "ties"] = "linear"
    lambda_: float = Lambda
    majority: Majority = "total"
    convention: Convention = "mergekit"
    normalize: bool = False
    seed: int = 0


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: DareConfig,
          generator: torch.Generator | None = None, base=None) -> torch.Tensor:
    kept = torch.stack([rescale_kept(t, t * bernoulli_mask(t, config.density, generator),
                                     config.density, config.rescale) for t in stacked])
    if config.then == "linear":
        return config.lambda_ * (kept * weights).sum(dim=0)
    return config.lambda_ * elect_and_merge(kept, weights, config.majority, config.convention,
                                            config.normalize)


MERGES.register("dare", DareConfig, merge=merge)
