"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
``W = W_base + λ Σ wᵢ τᵢ``. Equals PEFT's ``task_arithmetic`` (λ = 1) and mergekit's
``task_arithmetic`` (``normalize: false``, its default for this method). On LoRA adapters it
merges without densifying: ``λ Σ wᵢ BᵢAᵢ = [λw₁B₁, …, λwₖBₖ]·[A₁; …; Aₖ]`` exactly (rank Σ rᵢ)."""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from slimtune.merge.config import Lambda, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.lora_merging import stack_factors


class TaskArithmeticConfig(MergeConfig):
    example: ClassVar[dict] = {"lambda": 0.5}
    method: Literal["task_arithmetic"] = "task_arithmetic"
    lambda_: float = Lambda


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: TaskArithmeticConfig,
          generator=None, base=None) -> torch.Tensor:
    return config.lambda_ * (stacked * weights).sum(dim=0)


def merge_factors(factors, weights: torch.Tensor, config: TaskArithmeticConfig, generator=None):
    return stack_factors(factors, config.lambda_ * weights)


MERGES.register("task_arithmetic", TaskArithmeticConfig, merge=merge, merge_factors=merge_factors,
                elementwise=lambda config: True)
