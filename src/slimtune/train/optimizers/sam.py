"""SAM (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization") and ASAM (Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization"):
each step takes two gradients. With g = ∇L(w):

    SAM:   ε = ρ · g / ‖g‖
    ASAM:  ε = ρ · T²g / ‖T g‖,  T = |w| + η   (elementwise; scale-invariant sharpness)

then g' = ∇L(w + ε) on the same batch, and the base optimiser (``base``: any registered
optimiser that does not wrap one itself, see :mod:`.wrapper`) steps from w with g'. The norms
are global over the trainable parameters. The loop gets the second gradient through
``step(closure)`` (the optimiser says ``needs_closure``); the base optimiser's keys (``lr``,
``betas``, ``eps``, ``weight_decay``, its own through ``base_params``) pass through. The base's
state is the state (the perturbation is undone within the step). Equal to the two-step update
written from the paper (tests).
Reported (METHODS.md): SAM state of the art on CIFAR / ImageNet at its time.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slimtune.train.optimizers.registry import OPTIMIZERS
from slimtune.train.optimizers.wrapper import (Wrapper, WrapperKeys, base_conflict, build_base,
                                              global_norm)


class SAMConfig(WrapperKeys):
    method: Literal["sam", "asam"] = "sam"
    rho: float = Field(0.05, gt=0, description="radius of the weight perturbation")
    eta: float = Field(0.01, ge=0, description="asam: T = |w| + eta")


class SAM(Wrapper):
    """Wraps ``base`` (:class:`~.wrapper.Wrapper`: its parameter groups, its state)."""

    def __init__(self, base: torch.optim.Optimizer, rho: float, adaptive: bool, eta: float):
        super().__init__(base, {"rho": rho, "adaptive": adaptive, "eta": eta})

    def perturbation(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """``T ⊙ g`` (T = 1 for SAM)."""
        return (p.abs() + group["eta"]) * p.grad if group["adaptive"] else p.grad

    @torch.no_grad()
    def step(self, closure=None):
        self.check_closure(closure, "sam/asam", "two")
        pairs = self.pairs()
        norm = global_norm(self.perturbation(p, g) for p, g in pairs)
        moved = []
        for p, group in pairs:
            scaled = self.perturbation(p, group)
            if group["adaptive"]:
                scaled = scaled * (p.abs() + group["eta"])
            moved.append((p, scaled * (group["rho"] / (norm + 1e-12))))
        return self.step_at(moved, closure)


def build(model: torch.nn.Module, config: SAMConfig) -> torch.optim.Optimizer:
    return SAM(build_base(model, config), config.rho, config.method == "asam", config.eta)


OPTIMIZERS.register("sam", SAMConfig, build=build, conflict=base_conflict)
OPTIMIZERS.register("asam", SAMConfig, build=build, conflict=base_conflict)
