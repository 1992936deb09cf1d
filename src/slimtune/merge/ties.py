"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"):
trim each task vector to its top-``density`` magnitudes, elect one sign per entry by the summed
mass (``majority: total``) or by the count of signs (``frequency``), average the entries that
agree with it, scale by λ.

``scope: tensor`` (default) trims per tensor (``int(density · numel)`` entries, as PEFT and
mergekit do); ``scope: model`` trims as the paper states it, the top-k over each model's whole
flattened task vector, keeping ``|τ| >=`` its exact k-th magnitude (on one tensor,
:func:`~slimtune.merge.merge_deltas`, that tensor is the whole vector). A model-level merge finds
the thresholds in streaming passes (hook ``trim``; for ``scope: tensor`` too, on tensors larger
than one chunk, giving the same trim) and merges the trimmed rows chunk by chunk. ``convention`` picks how weights enter,
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
from slimtune.weights.magnitude_threshold import kth_magnitude
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
          generator=None, base=None, trimmed: bool = False) -> torch.Tensor:
    if not trimmed:
        stacked = torch.stack([trim(t, config) for t in stacked])
    return config.lambda_ * elect_and_merge(stacked, weights, config.majority, config.convention,
                                            config.normalize)


def trim(t: torch.Tensor, config: TiesConfig) -> torch.Tensor:
    if config.scope == "model":
        return t * (t.abs() >= kth_magnitude([t], int(config.density * t.numel())))
    return keep_top_magnitude(t, config.density, "topk" if config.convention == "peft"
                              else "argsort")


MERGES.register("ties", TiesConfig, merge=merge, elementwise=lambda config: True,
                trim=lambda config: (config.scope, config.density))
