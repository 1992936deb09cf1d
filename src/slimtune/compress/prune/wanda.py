"""Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models").

Score every weight by ``|W_ij| · ||X_j||₂`` (``||X_j||₂``: the L2 norm of input ``j`` over all
calibration tokens, taken on the already-compressed earlier blocks) and zero the lowest
``floor(sparsity · in)`` of each output row -- for N:M, the lowest ``M - N`` of each group of M
consecutive inputs of a row. No weight update, no Gram matrix: only the per-input sums of
squares are collected.

Reported (METHODS.md, LLaMA-2-7B WikiText-2, dense 5.12): 6.42 at 50%, 11.02 at 2:4 (SparseGPT
6.51 / 10.17, magnitude 14.89 / 54.59).
"""
from __future__ import annotations

from typing import Literal

import torch

from slimtune.compress.prune.common import PruneConfig, PruneStep, check_layer
from slimtune.compress.registry import METHODS
from slimtune.weights.sparsity import nm_mask, row_mask, wanda_scores

NEEDS = frozenset({"mean_abs"})  # InputStatistics without the Gram matrix: has sum x² per input


class WandaConfig(PruneConfig):
    """``method: wanda`` -- targets, sparsity, pattern."""

    method: Literal["wanda"] = "wanda"


def input_norms(stats) -> torch.Tensor:
    """``||X_j||₂`` per input from the layer's calibration statistics."""
    inputs = getattr(stats, "inputs", None)
    if inputs is None or inputs.n_tokens == 0:
        raise ValueError("wanda needs the layer's calibration inputs (needs={'mean_abs'})")
    return inputs.sq_sum.sqrt()


def build(config: WandaConfig) -> PruneStep:
    nm = config.nm

    def prune(name, W, stats):
        scores = wanda_scores(W, input_norms(stats))
        mask = nm_mask(scores, *nm) if nm is not None else row_mask(scores, config.fraction)
        return W * mask, mask, {}

    return PruneStep("wanda", config, NEEDS, prune)


METHODS.register("wanda", WandaConfig, build=build, check_layer=check_layer)
