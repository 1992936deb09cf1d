"""Cautious AdamW (Liang et al. 2024, "Cautious Optimizers: Improving Training with One Line of
Code"): AdamW's update u is applied only where it agrees in sign with the current gradient, and
rescaled so its size is kept:

    φ = 1[u ⊙ g > 0],   θ ← θ − lr · φ ⊙ u · d / (nnz(φ) + 1) − lr·λ·θ     (d = entries of θ)

(:class:`~slimtune.train.optimizers.moments.AdamWithRule` computes u and applies the rule.) The paper reports up to
1.47× faster LLaMA and MAE pre-training at the same quality. Property tested: no entry moves
against its current gradient, and where every sign agrees the step is AdamW's × d / (d + 1).
"""
from __future__ import annotations

from typing import Literal

import torch

from slimtune.train.optimizers.config import AdamKeys, trainable
from slimtune.train.optimizers.moments import AdamWithRule
from slimtune.train.optimizers.registry import OPTIMIZERS


class CautiousConfig(AdamKeys):
    method: Literal["cautious"] = "cautious"


def cautious_update(u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``φ ⊙ u · d / (nnz(φ) + 1)`` with ``φ = 1[u ⊙ g > 0]``."""
    agree = (u * grad > 0).to(u.dtype)
    return u * agree * (agree.numel() / (agree.sum() + 1))


def build(model: torch.nn.Module, config: CautiousConfig) -> torch.optim.Optimizer:
    return AdamWithRule(trainable(model), cautious_update, config.lr, config.betas, config.eps,
                        config.weight_decay)


OPTIMIZERS.register("cautious", CautiousConfig, build=build)
