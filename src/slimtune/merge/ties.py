"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models"):
trim each task vector to its top-``density`` magnitudes, elect one sign per entry by the summed
mass (``majority: total``) or by the count of signs (``frequency``), average the entries that
agree with it, scale by λ.

``scope: tensor`` (default) trims per tensor (``int(density · numel)`` entries, at least one
for ``convention: mergekit``, as PEFT and mergekit do); ``scope: model`` trims as the paper states
it, the top-k over each model's whole flattened task vector, keeping ``|τ| >=`` its exact k-th
magnitude (on one tensor, :func:`~slimtune.merge.merge_deltas`, that tensor is the whole vector).
A model-level merge finds the thresholds in streaming passes (hook ``trim`` for ``scope: model``,
hook ``stream`` for a tensor larger than one chunk) and merges the trimmed rows chunk by chunk,
so no tensor is ever whole in memory.

``tie_break`` says which of the entries tied in magnitude at a tensor's threshold are kept (real
weights have such ties: SmolLM2's are dequantised 4-bit values, so unseen tokens' embedding rows
move alike): ``index`` (default) the first by position, the same whether the tensor is whole or
streamed; ``peer`` the order of the convention's peer (PEFT: ``torch.topk``; mergekit: a
descending ``torch.argsort``), which are unstable sorts of the whole tensor, so a tensor where a
non-zero tie straddles the threshold is then merged whole (an embedding: ~0.5 GB more memory).
``convention`` picks how weights enter, where the two peers differ on purpose
(:func:`~slimtune.weights.task_vectors.elect_and_merge`): ``mergekit`` (default) elects on the
weighted vectors and divides by the agreeing weights' sum; ``peft`` elects on the unweighted ones
and divides by the agreeing count. With unit weights both are the paper's disjoint mean
(``normalize: false``: the agreeing entries summed, undivided). Equal to mergekit 0.1.5's
``ties`` and PEFT's ``ties`` in their conventions with ``tie_break: peer`` (tests); with
``index``, equal but for which tied entries at a threshold are kept.
Reported (METHODS.md): none for this scale.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from slimtune.merge.config import Convention, Density, Lambda, Majority, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.magnitude_threshold import TopMagnitudeMask, kth_magnitude
from slimtune.weights.task_vectors import elect_and_merge, keep_top_magnitude


class TiesConfig(MergeConfig):
    example: ClassVar[dict] = {"density": 0.5}
    method: Literal["ties"] = "ties"
    density: float = Density
    lambda_: float = Lambda
    majority: Majority = "total"
    scope: Literal["tensor", "model"] = "tensor"
    convention: Convention = "mergekit"
    tie_break: Literal["index", "peer"] = "index"
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
    peer = "topk" if config.convention == "peft" else "argsort"
    return keep_top_magnitude(t, config.density, peer if config.tie_break == "peer" else "index",
                              at_least_one=config.convention == "mergekit")


class TiesStream:
    """``scope: tensor`` on a tensor read in ranges of rows: each model's exact top-k mask from
    two counting passes (:class:`~slimtune.weights.magnitude_threshold.TopMagnitudeMask`)."""

    def __init__(self, config: TiesConfig, weights: torch.Tensor, shape: tuple[int, ...]):
        n = math.prod(shape)
        k = int(config.density * n)
        k = min(n, max(1, k)) if config.convention == "mergekit" else k
        self.masks = [TopMagnitudeMask(n, k) for _ in range(weights.shape[0])]
        self.config, self.weights, self.passes, self.whole = config, weights, 0, False

    def wants_pass(self) -> bool:
        return self.passes < 2

    def observe(self, stacked: torch.Tensor, base: torch.Tensor) -> None:
        for mask, t in zip(self.masks, stacked):
            mask.count(t)

    def end_pass(self) -> None:
        self.passes += 1
        for mask in self.masks:
            mask.next_pass()
        if self.passes == 2 and self.config.tie_break == "peer":
            self.whole = any(m.straddles and m.threshold != 0 for m in self.masks)

    def merge_rows(self, stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        for mask, t in zip(self.masks, stacked):
            t *= mask.mask(t)
        return merge(stacked, self.weights, self.config, trimmed=True)


MERGES.register("ties", TiesConfig, merge=merge, elementwise=lambda config: config.scope == "model",
                trim=lambda config: ("model", config.density) if config.scope == "model" else None,
                stream=lambda config, weights, shape, generator=None:
                TiesStream(config, weights, shape) if config.scope == "tensor" else None)
