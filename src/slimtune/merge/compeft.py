"""ComPEFT (Yadav et al. 2023, "ComPEFT: Compression for Communicating Parameter Efficient Updates
via Sparsification and Quantization"): each task vector is kept at its top-``density``
magnitudes and ternarised, ``τ̂ = scale · std(τ) · sign(trim(τ))`` (one scale per tensor: the
paper's α times the task vector's standard deviation), then the compressed vectors are added as
task arithmetic, ``λ Σ wᵢ τ̂ᵢ``. Reported (METHODS.md): "compression ratios of 8x - 50x"; on
LLaMA it beats QLoRA by 4.16% on MMLU at up to 26x smaller storage (seeds/003).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimtune.merge.config import Density, Lambda, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.task_vectors import keep_top_magnitude


class ComPEFTConfig(MergeConfig):
    example: ClassVar[dict] = {"density": 0.2, "scale": 0.5}
    method: Literal["compeft"] = "compeft"
    density: float = Density
    scale: float = Field(1.0, gt=0, description="α: the ternary values are ±α·std(τ)")
    lambda_: float = Lambda


def ternarise(t: torch.Tensor, density: float, scale: float) -> torch.Tensor:
    """``scale · std(t) · sign`` of ``t``'s top-``density`` entries, 0 elsewhere."""
    return scale * t.float().std().to(t.dtype) * keep_top_magnitude(t, density).sign()


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: ComPEFTConfig, generator=None,
          base=None) -> torch.Tensor:
    ternary = torch.stack([ternarise(t, config.density, config.scale) for t in stacked])
    return config.lambda_ * (ternary * weights).sum(dim=0)


MERGES.register("compeft", ComPEFTConfig, merge=merge)
