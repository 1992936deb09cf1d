"""Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic"):
``W = W_base + λ Σ wᵢ τᵢ``. Equals PEFT's ``task_arithmetic`` (λ = 1) and mergekit's
``task_arithmetic`` (``normalize: false``, its default for this method)."""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from slimtune.merge.config import Lambda, MergeConfig
from slimtune.merge.registry import MERGES


class TaskArithmeticConfig(MergeConfig):
    example: ClassVar[dict] = {"lambda": 0.5}
    method: Literal["task_arithmetic"] = "task_arithmetic"
    lambda_: float = Lambda


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: TaskArithmeticConfig,
          generator=None, base=None) -> torch.Tensor:
    return config.lambda_ * (stacked * weights).sum(dim=0)


MERGES.register("task_arithmetic", TaskArithmeticConfig, merge=merge)
