"""Optimisers by name (:data:`.registry.OPTIMIZERS`, one file each): ``build(name, model,
**config)`` validates the keys (one error naming every bad key) and returns a
``torch.optim.Optimizer`` over the model's trainable parameters. Importing this package
registers every built-in optimiser once."""
from __future__ import annotations

import torch

from slimtune.train.optimizers import (adamw, cautious, fira, fsam, galore,  # noqa: F401
                                       gam, grams, lion, mars, sam)  # (importing registers them)
from slimtune.train.optimizers.registry import OPTIMIZERS

__all__ = ["OPTIMIZERS", "build"]


def build(name: str, model: torch.nn.Module, **config) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(OPTIMIZERS.unknown(name))
    validated = OPTIMIZERS.make_config(name, "optimizer", **config)
    return OPTIMIZERS.get(name).hook("build")(model, validated)
