"""RTN: round to nearest on a per-(row, group) grid, the baseline of every quantisation paper.

Each weight is mapped to the nearest point of its own min/max grid (:mod:`slimtune.weights.quant`,
the compressed-tensors convention: signed integers, zero included in the range). Needs no
calibration. Reported (GPTQ's comparison, METHODS.md): LLaMA-7B WikiText-2 perplexity 6.29 at
4 bits and 25.54 at 3 bits (dense 5.68), where GPTQ reaches 6.09 and 8.07.
"""
from __future__ import annotations

from typing import Literal

from slimtune.compress.quant.common import QuantConfig, QuantStep, check_layer
from slimtune.compress.registry import METHODS
from slimtune.weights.quant import round_to_nearest

NEEDS: frozenset[str] = frozenset()


class RTNConfig(QuantConfig):
    """``method: rtn`` -- targets, bits, group_size, sym."""

    method: Literal["rtn"] = "rtn"


def build(config: RTNConfig) -> QuantStep:
    return QuantStep("rtn", config, NEEDS,
                     lambda W, stats, spec, keep: (*round_to_nearest(W, spec), {}))


METHODS.register("rtn", RTNConfig, build=build, check_layer=check_layer)
