"""The factored linear layer every slimtune method produces, and its parts and bases.

``FactoredLinear`` (:mod:`.factored`) = base (:mod:`.bases`, optionally masked) + low-rank
``s·B·K·A`` + sparse delta + whole-weight transform (:mod:`.parts`) + bias.
"""
from slimtune.layers.bases import BASES, DenseBase, PackedQuantBase, build_base
from slimtune.layers.factored import FactoredLinear
from slimtune.layers.parts import (TRANSFORMS, LowRank, SparseDelta, WeightNormScale,
                                   build_transform, empty_lowrank)

__all__ = ["BASES", "TRANSFORMS", "DenseBase", "FactoredLinear", "LowRank", "PackedQuantBase",
           "SparseDelta", "WeightNormScale", "build_base", "build_transform", "empty_lowrank"]
