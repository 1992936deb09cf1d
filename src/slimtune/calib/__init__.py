"""Calibration: the block-by-block pipeline that compression steps and data-driven adapters run
on (:mod:`.pipeline`, mechanics in :mod:`.blocks`), the one calibration-window sampler
(:mod:`.windows`) and Fisher diagonals (:mod:`.fisher`)."""
from slimtune.calib.blocks import SameInput, UnsupportedArchitectureError, find_blocks, trim_heap
from slimtune.calib.fisher import fisher_diagonals
from slimtune.calib.pipeline import (NEEDS, SEQUENTIAL, BlockStep, LayerStats, choose_sequential,
                                     run_pipeline)
from slimtune.calib.windows import calibration_windows, sample_windows

__all__ = ["NEEDS", "SEQUENTIAL", "BlockStep", "LayerStats", "SameInput",
           "UnsupportedArchitectureError", "calibration_windows", "choose_sequential", "fisher_diagonals", "find_blocks", "run_pipeline",
           "sample_windows", "trim_heap"]
