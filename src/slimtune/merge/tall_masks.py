"""Consensus Merging with TALL masks (Wang et al. 2024, "Localizing Task Information for Improved
Model Merging and Compression", ICML 2024): build the multi-task vector by task arithmetic, find
each task's support with a TALL mask, and keep only the entries that at least ``consensus`` tasks
use (dropping "selfish" weights used by one task and "catastrophic" ones used by none):

    τ_MTL = Σᵢ wᵢ τᵢ,   mᵢ = |τᵢ| > λᵢ · |τ_MTL − τᵢ|,
    τ = λ · τ_MTL ⊙ [Σᵢ mᵢ ≥ consensus]

(:func:`~slimtune.weights.task_masks.tall_masks`, :func:`~slimtune.weights.task_masks.
consensus_mask`). ``lambdas``: one λᵢ per model, or one for all; ``consensus``: the least number
of tasks (the reference's ``prun_thre_k``, default 2 as in its ``consensus.yaml``); ``lambda``:
the scale of the result (the reference tunes it on validation data).

As in the authors' code (github nik-dim/tall_masks, ``src/utils/tallmask_utils.py``
``generate_task_masks`` and ``construct_consensus_mask``) the mask comparison is strict (``>``)
and the consensus count is ``>=``. Differences: the reference picks each task's λᵢ from
{0.2, 0.3, 0.4, 0.5, 0.6} by that task's validation accuracy; here they are given (default 0.4,
the middle of that grid). Model weights enter τ_MTL only; each mask compares the fine-tuned model
itself, ``θ₀ + τᵢ``, with the base and with ``θ₀ + τ_MTL`` (unit weights: the reference). The
reference masks the whole flattened model at once; the masks are per entry, so per tensor is the
same. Computed in float32 (float64 for float64 input), returned in the input's dtype. Reported
(METHODS.md): the TALL masks retrieve ">99% of the single task accuracy";
Consensus Merging improves task arithmetic and TIES with up to 20 tasks (seeds/004).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, field_validator

from slimtune.merge.config import Lambda, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.precision import compute_dtype
from slimtune.weights.task_masks import consensus_mask, tall_masks


class TallMasksConfig(MergeConfig):
    example: ClassVar[dict] = {"lambdas": 0.4, "consensus": 2}
    method: Literal["tall_masks"] = "tall_masks"
    lambdas: float | list[float] = Field(0.4, description="λ of each task's TALL mask (one per "
                                                           "model, or one for all)")
    consensus: int = Field(2, ge=1, description="least number of task masks that keep an entry")
    lambda_: float = Lambda

    @field_validator("lambdas", mode="before")
    @classmethod
    def _non_negative(cls, value):
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and v >= 0 for v in values):
            raise ValueError("must be a number >= 0 or a non-empty list of them (one per model), "
                             f"got {value!r}")
        return value


def task_lambdas(config: TallMasksConfig, count: int, like: torch.Tensor) -> torch.Tensor:
    """``[count]``: one λᵢ per model; a list of another length is an error naming ``lambdas``."""
    values = config.lambdas if isinstance(config.lambdas, list) else [config.lambdas] * count
    if len(values) != count:
        raise ValueError(f"tall_masks: lambdas: {len(values)} values for {count} models; give "
                         "one per model or a single number")
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: TallMasksConfig, generator=None,
          base=None) -> torch.Tensor:
    work = stacked.to(compute_dtype(stacked))
    lambdas = task_lambdas(config, stacked.shape[0], work)
    multi = (work * weights.to(work.dtype)).sum(dim=0)
    keep = consensus_mask(tall_masks(work, multi, lambdas), config.consensus)
    return (config.lambda_ * multi * keep).to(stacked.dtype)


MERGES.register("tall_masks", TallMasksConfig, merge=merge, elementwise=lambda config: True)
