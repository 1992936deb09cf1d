"""The factored linear layer every slimtune method produces, and its parts and bases.

``FactoredLinear`` (:mod:`.factored`) = base (:mod:`.bases`, optionally masked) + low-rank
``s·B·K·A`` + sparse delta + whole-weight transform (:mod:`.parts`) + bias; low-rank parts with
regenerated fixed factors (:mod:`.fixed_factors`: VeRA, NOLA, MiSS); nested low rank usable at
every leading rank (:mod:`.nested_lowrank`: DyLoRA); what it costs to store (:mod:`.storage`).
"""
from slimtune.layers.bases import BASES, DenseBase, PackedQuantBase, build_base
from slimtune.layers.factored import FactoredLinear
from slimtune.layers.fixed_factors import RandomBasisLowRank, ScaledRandomLowRank, TiledLowRank
from slimtune.layers.nested_lowrank import NestedLowRank
from slimtune.layers.parts import (TRANSFORMS, LowRank, SparseDelta, WeightNormScale,
                                   build_transform, empty_lowrank)
from slimtune.layers.storage import storage_bits, storage_report

__all__ = ["BASES", "TRANSFORMS", "DenseBase", "FactoredLinear", "LowRank", "NestedLowRank",
           "PackedQuantBase", "RandomBasisLowRank", "ScaledRandomLowRank", "SparseDelta",
           "TiledLowRank", "WeightNormScale", "build_base", "build_transform", "empty_lowrank",
           "storage_bits", "storage_report"]
