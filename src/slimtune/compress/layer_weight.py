"""What a compression step reads from and writes to a targeted layer (not a method itself).

A target is an ``nn.Linear`` (nothing compressed it yet) or a :class:`FactoredLinear` that earlier
steps made. Steps that rewrite the *base* (pruning, quantisation) use :func:`dense_part`: the
plain dense base they may replace, keeping the layer's low-rank and sparse parts and its mask.
Steps that add a part (outliers, low-rank compensation) use :func:`as_factored` and
:func:`add_lowrank`.
:func:`current_weight` is the weight the layer applies now, whatever it is made of.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from slimtune.layers import DenseBase, FactoredLinear, LowRank


def dense_part(layer: nn.Module) -> tuple[Tensor, FactoredLinear | None]:
    """The dense base weight to rewrite and the factored layer holding it (None for a plain
    linear). The layer's mask, if any, is ``factored.mask``."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach(), None
    if isinstance(layer, FactoredLinear) and isinstance(layer.base, DenseBase) and (
            not layer.merged and layer.transform is None):
        return layer.base.dense_weight().detach(), layer
    raise TypeError(f"this step rewrites the dense weight of an nn.Linear or of a FactoredLinear "
                    f"with a plain dense base; got {type(layer).__name__}"
                    + (f" with a {type(layer.base).__name__} base" if hasattr(layer, "base")
                       else "") + " (put it before the steps that quantise or factor the layer)")


def as_factored(layer: nn.Module) -> FactoredLinear:
    """``layer`` itself if factored, else a FactoredLinear over a copy of its weight and bias."""
    if isinstance(layer, FactoredLinear):
        if layer.merged:
            raise TypeError("cannot add a part to a merged FactoredLinear")
        return layer
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"expected an nn.Linear or a FactoredLinear, got {type(layer).__name__}")
    bias = None if layer.bias is None else layer.bias.detach().clone()
    return FactoredLinear(layer.in_features, layer.out_features,
                          base=DenseBase(layer.weight.detach().clone()), bias=bias)


def with_base(layer: nn.Module, base: nn.Module, factored: FactoredLinear | None,
              mask: Tensor | None = None) -> FactoredLinear:
    """Put ``base`` (and ``mask``, if given) in place of the dense base :func:`dense_part` found."""
    if factored is None:
        bias = None if layer.bias is None else layer.bias.detach().clone()
        return FactoredLinear(layer.in_features, layer.out_features, base=base, bias=bias,
                              mask=mask)
    factored.base = base
    if mask is not None:
        factored.set_mask(mask)
    return factored


def current_weight(layer: nn.Module) -> Tensor:
    """The ``[out, in]`` weight the layer applies now (detached)."""
    if isinstance(layer, FactoredLinear):
        return layer.dense_weight().detach()
    return layer.weight.detach()


def add_lowrank(layer: FactoredLinear, A: Tensor, B: Tensor) -> FactoredLinear:
    """Add the frozen ``B·A`` to the layer's low-rank part (stacked beside an existing one)."""
    like = current_weight(layer)
    A, B = A.to(like), B.to(like)
    old = layer.lowrank
    if old is not None:
        if not isinstance(old, LowRank):
            raise TypeError(f"cannot stack a low-rank part beside a {type(old).__name__}")
        Bo = old.B.detach() if old.core is None else (
            old.B.detach() * old.core.detach() if old.core.dim() == 1
            else old.B.detach() @ old.core.detach())
        A, B = torch.cat([old.A.detach(), A]), torch.cat([Bo * old.scale, B], dim=1)
    layer.lowrank = LowRank(A.contiguous(), B.contiguous(), train_A=False, train_B=False)
    return layer
