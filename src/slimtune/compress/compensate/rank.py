"""The ``rank`` field the low-rank compensation steps share, and its per-layer check."""
from __future__ import annotations

from pydantic import Field
from torch import nn

from slimtune.compress.config import StepConfig


class RankConfig(StepConfig):
    """``targets`` and ``rank`` (of the low-rank part each targeted layer gets)."""

    rank: int = Field(..., ge=1, strict=True, description="rank of the low-rank part")


def check_layer(config: RankConfig, name: str, layer: nn.Module) -> None:
    """Before any work: the rank fits the layer."""
    limit = min(layer.in_features, layer.out_features)
    if config.rank > limit:
        raise ValueError(f"rank {config.rank} exceeds min(out, in) = {limit}")
