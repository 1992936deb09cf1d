"""Grams (Cao et al. 2024, "Grams: Gradient Descent with Adaptive Momentum Scaling"): the
direction of each entry's step is the current gradient's sign, its size Adam's:

    θ ← θ − lr · sign(g) ⊙ |u| − lr·λ·θ,    u = m̂ / (√v̂ + ε)

(:class:`~slimtune.train.optimizers.moments.AdamWithRule` computes u and applies the rule.) Property tested: every
entry moves against its current gradient by exactly AdamW's step size.
"""
from __future__ import annotations

from typing import Literal

import torch

from slimtune.train.optimizers.config import AdamKeys, trainable
from slimtune.train.optimizers.moments import AdamWithRule
from slimtune.train.optimizers.registry import OPTIMIZERS


class GramsConfig(AdamKeys):
    method: Literal["grams"] = "grams"


def grams_update(u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``sign(g) ⊙ |u|``."""
    return grad.sign() * u.abs()


def build(model: torch.nn.Module, config: GramsConfig) -> torch.optim.Optimizer:
    return AdamWithRule(trainable(model), grams_update, config.lr, config.betas, config.eps,
                        config.weight_decay)


OPTIMIZERS.register("grams", GramsConfig, build=build)
