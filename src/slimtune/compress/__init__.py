"""Post-training compression: a YAML recipe of steps (:mod:`.recipe`), each a registered method
(:data:`.registry.METHODS`) run block by block by :func:`slimtune.calib.run_pipeline`.

Importing this package registers every built-in method once.
"""
from slimtune.compress.lowrank import asvd, fwsvd, svd, svd_llm  # noqa: F401  (registers them)
from slimtune.compress.quant import gptq, outliers, rtn  # noqa: F401
from slimtune.compress.prune import magnitude, sparsegpt, wanda  # noqa: F401
from slimtune.compress.compensate import eora, lost, lowrank_first  # noqa: F401
from slimtune.compress.recipe import (RecipeError, build_steps, check_targets, known_methods,
                                      load_recipe, method_config)
from slimtune.compress.registry import METHODS

__all__ = ["METHODS", "RecipeError", "build_steps", "check_targets", "known_methods",
           "load_recipe", "method_config"]
