"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"):
trim each task vector to its top-``density`` magnitudes, elect one sign per entry by the summed
mass (``majority: total``) or by the count of signs (``frequency``), average the entries that
agree with it, scale by λ.

``scope: tensor`` (default) trims per tensor (``int(density · numel)`` entries, as PEFT and
mergekit do); ``scope: model`` trims as the paper states it, the top-k over each model's whole
flattened task vector: a model-level merge finds each model's exact k-th magnitude in two
streaming passes (hook ``global_trim``) and keeps ``|τ| >= threshold``, after which the elect and
merge are per entry (the merge then runs on chunks of rows). ``convention`` picks how weights enter,
where the two peers differ on purpose (:func:`~slimtune.weights.task_vectors.elect_and_merge`):
``mergekit`` (default) elects on the weighted vectors and divides by the agreeing weights' sum;
``peft`` elects on the unweighted ones and divides by the agreeing count; each also trims ties in
magnitude in its peer's order. With unit weights both
are the paper's disjoint mean (``normalize: false``: the agreeing entries summed, undivided).
Equal to mergekit 0.1.5's ``ties`` and PEFT's ``ties`` in their conventions (tests).
Reported (METHODS.md): none for this scale.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from slimtune.merge.config import Convention, Density, Lambda, Majority, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.task_vectors import elect_and_merge, keep_top_magnitude


class TiesConfig(MergeConfig):
    example: ClassVar[dict] = {"density": 0.5}
    method: Literal["ties"] = "ties"
    density: float = Density
    lambda_: float = Lambda
    majority: Majority = "total"
    scope: Literal["tensor", "model"] = "tensor"
    convention: Convention = "mergekit"
    normalize: bool = True


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: TiesConfig,
          generator=None, base=None) -> torch.Tensor:
    if config.scope == "model":
        trimmed = stacked  # trimmed over the whole task vector by the caller (global_trim)
    else:
        order = "topk" if config.convention == "peft" else "argsort"
        trimmed = torch.stack([keep_top_magnitude(t, config.density, order) for t in stacked])
    return config.lambda_ * elect_and_merge(trimmed, weights, config.majority, config.convention,
                                            config.normalize)


MERGES.register("ties", TiesConfig, merge=merge,
                global_trim=lambda config: config.density if config.scope == "model" else None,
                elementwise=lambda config: config.scope == "model")
