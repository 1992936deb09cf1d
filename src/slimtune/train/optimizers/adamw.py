"""AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"): PyTorch's
``torch.optim.AdamW`` over the trainable parameters, the loop's default."""
from __future__ import annotations

from typing import Literal

import torch

from slimtune.train.optimizers.config import AdamKeys, trainable
from slimtune.train.optimizers.registry import OPTIMIZERS


class AdamWConfig(AdamKeys):
    method: Literal["adamw"] = "adamw"


def build(model: torch.nn.Module, config: AdamWConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(model), lr=config.lr, betas=config.betas, eps=config.eps,
                             weight_decay=config.weight_decay)


OPTIMIZERS.register("adamw", AdamWConfig, build=build)
