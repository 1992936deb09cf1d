"""Bases of a ``FactoredLinear``: the frozen weight the low-rank and sparse parts are added to.

A base has ``kind``, ``dense_weight()``, ``forward(x)`` and ``add_(delta)``; :class:`DenseBase` is
the plain one (a packed quantised base implements the same four). :data:`BASES` maps ``kind`` to
a constructor of an empty base of a given shape, for rebuilding saved layers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DenseBase(nn.Module):
    """A frozen dense weight (out × in)."""

    kind = "dense"

    def __init__(self, weight: Tensor, trainable: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=trainable)

    def dense_weight(self) -> Tensor:
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    @torch.no_grad()
    def add_(self, delta: Tensor) -> None:
        self.weight.add_(delta.to(self.weight.dtype))


BASES = {DenseBase.kind: lambda n_out, n_in, **kw: DenseBase(torch.empty(n_out, n_in, **kw))}


def build_base(kind: str, n_out: int, n_in: int, **kw) -> nn.Module:
    if kind not in BASES:
        raise ValueError(f"unknown base kind {kind!r}; known: {sorted(BASES)}")
    return BASES[kind](n_out, n_in, **kw)
