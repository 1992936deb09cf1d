"""LOST-style split (low-rank + sparse; LOST and SLTrain's ``W = B·A + S``).

Each targeted weight becomes its top-``rank`` SVD part ``B·A`` (balanced factors) plus a sparse
remainder ``S`` that keeps the largest-magnitude ``1 - sparsity`` fraction of the residual
``W - B·A`` exactly (the rest of the residual is dropped): the layer has no dense base any more,
only the low-rank and sparse parts (:func:`slimtune.weights.compensation.principal_split`,
:func:`~slimtune.weights.compensation.top_entries`). No calibration needed. The sparse part
stores an int64 index and a value per kept entry, so it pays off only at high ``sparsity``.

Reported (METHODS.md): SLTrain "up to 73%" memory cut for LLaMA-7B pretraining with this form.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.compress.compensate.rank import RankConfig, check_layer
from slimtune.compress.layer_weight import dense_part
from slimtune.compress.registry import METHODS
from slimtune.layers import FactoredLinear, LowRank, SparseDelta
from slimtune.weights.compensation import principal_split, top_entries
from slimtune.weights.sparsity import prune_count

NEEDS: frozenset[str] = frozenset()


class LOSTConfig(RankConfig):
    """``method: lost`` -- targets, rank, sparsity (of the residual)."""

    method: Literal["lost"] = "lost"
    sparsity: float = Field(..., ge=0, lt=1, description="fraction of the residual W - B·A "
                            "dropped; the rest is kept exactly as the sparse part")


class LOSTStep:
    def __init__(self, config: LOSTConfig):
        self.config, self.targets, self.needs = config, config.targets, NEEDS

    @torch.no_grad()
    def apply(self, name: str, layer: nn.Module, stats) -> nn.Module:
        W, factored = dense_part(layer)
        if factored is not None and (factored.lowrank is not None or factored.sparse is not None
                                     or factored.mask_bits is not None):
            raise ValueError("lost replaces the whole weight; the layer already has parts")
        A, B, rest = principal_split(W, self.config.rank)
        keep = rest.numel() - prune_count(self.config.sparsity, rest.numel())
        idx = top_entries(rest.abs(), keep)
        sparse = SparseDelta(tuple(W.shape), idx, rest.reshape(-1)[idx].to(W), trainable=False)
        bias = getattr(layer, "bias", None)
        return FactoredLinear(layer.in_features, layer.out_features,
                              lowrank=LowRank(A.to(W).contiguous(), B.to(W).contiguous(),
                                              train_A=False, train_B=False),
                              sparse=sparse, bias=None if bias is None else bias.detach().clone())

    def __repr__(self) -> str:
        c = self.config
        return f"LOSTStep(rank={c.rank}, sparsity={c.sparsity:g})"


METHODS.register("lost", LOSTConfig, build=LOSTStep, check_layer=check_layer)
