"""Learning-rate schedule: linear warmup, then cosine decay.

For optimiser step ``s`` (0-based; the first step is s = 0) of ``steps``, with ``W`` warmup steps
and final ratio ``m``, the learning rate is ``lr * f(s)``::

    f(s) = (s + 1) / W                                   s < W   (reaches 1 at s = W - 1)
    f(s) = m + (1 - m) * (1 + cos(pi * (s - W) / (steps - W))) / 2      s >= W

so no step runs at lr 0, the first step after warmup runs at the full lr, and the curve would
reach ``m * lr`` one step after the last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class WarmupCosine:
    """``f(s)`` above as a callable for ``torch.optim.lr_scheduler.LambdaLR`` (its fields are
    saved in the scheduler's ``state_dict``)."""

    steps: int
    warmup: int = 0
    min_ratio: float = 0.0

    def __post_init__(self):
        if self.steps < 1 or not 0 <= self.warmup <= self.steps:
            raise ValueError(f"need steps >= 1 and 0 <= warmup <= steps; got steps={self.steps}, "
                             f"warmup={self.warmup}")
        if not 0 <= self.min_ratio <= 1:
            raise ValueError(f"min_ratio must be in [0, 1], got {self.min_ratio}")

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return (s + 1) / self.warmup
        progress = (s - self.warmup) / max(1, self.steps - self.warmup)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int = 0,
                  min_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler; call ``scheduler.step()`` once after every ``optimizer.step()``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(steps, warmup, min_ratio))
