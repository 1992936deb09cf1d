"""Magnitude pruning: zero the weights of smallest ``|W_ij|``, with no calibration data.

The baseline of every pruning paper. ``scope: layer`` prunes ``floor(sparsity · numel)`` entries of
each matrix (N:M: N kept of every M consecutive inputs of a row); ``scope: global`` sets one
threshold ``t`` over all targeted matrices together, so layers with larger weights keep more --
but every layer keeps at least ``min_keep`` of its weights (without that floor global magnitude
pruning empties whole layers). ``t`` is the smallest magnitude (found by bisection on the
weights themselves) at which the capped per-layer counts reach ``floor(sparsity · total)``;
entries tied at ``t`` are kept in the later layers so the total is exact. Ties among equal
magnitudes break by position (the earlier column is kept).

Reported (METHODS.md, LLaMA-2-7B WikiText-2, dense 5.12): 14.89 at 50%, 54.59 at 2:4; OPT-125M
50% 193 where SparseGPT reaches 36.85 (dense 27.66).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from slimtune.compress.layer_weight import dense_part
from slimtune.compress.prune.common import PruneConfig, PruneStep, check_layer
from slimtune.compress.registry import METHODS
from slimtune.weights.sparsity import layer_mask, magnitude_scores, nm_mask, prune_count, \
    prune_lowest

NEEDS: frozenset[str] = frozenset()


class MagnitudeConfig(PruneConfig):
    """``method: magnitude`` -- targets, sparsity, pattern, scope, min_keep."""

    method: Literal["magnitude"] = "magnitude"
    scope: Literal["layer", "global"] = Field("layer", description="one sparsity per layer, or "
                                              "one magnitude threshold over all targets")
    min_keep: float = Field(0.05, ge=0, le=1, description="with scope global: the fraction of "
                            "each layer's weights it keeps at least")

    @model_validator(mode="after")
    def _global_unstructured(self):
        if self.scope == "global" and self.nm is not None:
            raise ValueError("scope: 'global' sets one threshold for unstructured sparsity; an "
                             f"N:M pattern ({self.pattern}) is per group of M already")
        return self


def global_counts(weights: dict[str, torch.Tensor], sparsity: float, min_keep: float,
                  iterations: int = 64) -> dict[str, int]:
    """Entries to prune per matrix for one global magnitude threshold (module docstring)."""
    total = sum(w.numel() for w in weights.values())
    k = prune_count(sparsity, total)
    caps = {n: w.numel() - math.ceil(min_keep * w.numel()) for n, w in weights.items()}
    if k > sum(caps.values()):
        raise ValueError(f"sparsity {sparsity} cannot be reached while every layer keeps "
                         f"min_keep={min_keep} of its weights")

    def counts(t: float, strict: bool = False) -> dict[str, int]:
        return {n: min(int((w.abs() < t).sum() if strict else (w.abs() <= t).sum()), caps[n])
                for n, w in weights.items()}

    lo, hi = 0.0, max(float(w.abs().max()) for w in weights.values())
    if sum(counts(lo).values()) >= k:
        hi = lo
    for _ in range(iterations):  # smallest t with sum(counts(t)) >= k
        if hi - lo <= 0:
            break
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (lo, mid) if sum(counts(mid).values()) >= k else (mid, hi)
    at, below = counts(hi), counts(hi, strict=True)
    excess = sum(at.values()) - k
    for n in reversed(list(weights)):  # give back tied entries, last layers first
        back = min(excess, at[n] - below[n])
        at[n] -= back
        excess -= back
    return at


def build(config: MagnitudeConfig) -> PruneStep:
    counts: dict[str, int] = {}
    nm = config.nm

    def prepare(model, names):
        if config.scope == "global":
            weights = {n: dense_part(model.get_submodule(n))[0].float() for n in names}
            counts.update(global_counts(weights, config.fraction, config.min_keep))

    def prune(name, W, stats):
        scores = magnitude_scores(W)
        if nm is not None:
            mask = nm_mask(scores, *nm)
        elif config.scope == "global":
            mask = prune_lowest(scores, counts[name])
        else:
            mask = layer_mask(scores, config.fraction)
        return W * mask, mask, {}

    return PruneStep("magnitude", config, NEEDS, prune, prepare=prepare)


METHODS.register("magnitude", MagnitudeConfig, build=build, check_layer=check_layer)
