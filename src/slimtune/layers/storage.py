"""What a layer's weight costs to store: bits of every tensor that makes it up.

For a :class:`~slimtune.layers.FactoredLinear` that is its base (dense weight, or packed integers
with their scales and zero points), its mask bitmask, its low-rank factors (and core) and its
sparse part's indices and values -- everything in its state dict but the bias; for a plain
``nn.Linear`` its weight. Bits per weight divide that by ``out · in``, so a 4-bit layer with
fp32 scales per group of 64 and int8 zeros is 4 + 32/64 + 8/64 = 4.625, and a low-rank part or
outliers beside it count in full.
"""
from __future__ import annotations

from torch import nn


def storage_bits(layer: nn.Module) -> int:
    """Bits the layer stores for its weight (module docstring)."""
    if isinstance(layer, nn.Linear):
        return 8 * layer.weight.numel() * layer.weight.element_size()
    return 8 * sum(t.numel() * t.element_size() for k, t in layer.state_dict().items()
                   if k != "bias" and not k.startswith("origin."))


def storage_report(model: nn.Module, names: list[str]) -> dict:
    """``{"layers", "weights" (Σ out·in), "bits", "bits_per_weight", "megabytes"}`` of the named
    linear layers of ``model``."""
    weights = bits = 0
    for name in names:
        layer = model.get_submodule(name)
        weights += layer.in_features * layer.out_features
        bits += storage_bits(layer)
    return {"layers": len(names), "weights": weights, "bits": bits,
            "bits_per_weight": bits / weights if weights else 0.0, "megabytes": bits / 8e6}
