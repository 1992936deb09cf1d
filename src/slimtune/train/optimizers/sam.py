"""SAM (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization") and ASAM (Kwon et al. 2021, "ASAM: Adaptive Sharpness-Aware Minimization"):
each step takes two gradients. With g = ∇L(w):

    SAM:   ε = ρ · g / ‖g‖
    ASAM:  ε = ρ · T²g / ‖T g‖,  T = |w| + η   (elementwise; scale-invariant sharpness)

then g' = ∇L(w + ε) on the same batch, and the base optimiser (``base``: any registered
optimiser but these) steps from w with g'. The norms are global over the trainable parameters.
The loop gets the second gradient through ``step(closure)`` (the optimiser says
``needs_closure``); the base optimiser's keys (``lr``, ``betas``, ``eps``, ``weight_decay``,
its own through ``base_params``) pass through. The base's state is the state (the perturbation
is undone within the step). Equal to the two-step update written from the paper (tests).
Reported (METHODS.md): SAM state of the art on CIFAR / ImageNet at its time.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from slimtune.train.optimizers.config import AdamKeys
from slimtune.train.optimizers.registry import OPTIMIZERS


class SAMConfig(AdamKeys):
    method: Literal["sam", "asam"] = "sam"
    rho: float = Field(0.05, gt=0, description="radius of the weight perturbation")
    eta: float = Field(0.01, ge=0, description="asam: T = |w| + eta")
    base: str = Field("adamw", description="the optimiser that steps with the second gradient")
    base_params: dict = Field(default_factory=dict, description="the base optimiser's own keys")

    @field_validator("base")
    @classmethod
    def _known_base(cls, value: str) -> str:
        if value in ("sam", "asam") or value not in OPTIMIZERS:
            known = [n for n in OPTIMIZERS.names() if n not in ("sam", "asam")]
            raise ValueError(f"unknown base optimizer {value!r}; known: {', '.join(known)}")
        return value


class SAM(torch.optim.Optimizer):
    """Wraps ``base``: the same parameter groups (so the lr schedule reaches it), its state."""

    needs_closure = True

    def __init__(self, base: torch.optim.Optimizer, rho: float, adaptive: bool, eta: float):
        super().__init__(base.param_groups, {"rho": rho, "adaptive": adaptive, "eta": eta})
        self.base = base

    def perturbation(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """``T ⊙ g`` (T = 1 for SAM)."""
        return (p.abs() + group["eta"]) * p.grad if group["adaptive"] else p.grad

    @torch.no_grad()
    def step(self, closure=None):
        if closure is None:
            raise ValueError("sam/asam take two gradients per step: call step(closure) with a "
                             "closure that recomputes the loss's gradients")
        pairs = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([self.perturbation(p, g).norm() for p, g in pairs]))
        moved = []
        for p, group in pairs:
            scaled = self.perturbation(p, group)
            if group["adaptive"]:
                scaled = scaled * (p.abs() + group["eta"])
            e = scaled * (group["rho"] / (norm + 1e-12))
            p.add_(e)
            moved.append((p, e))
        with torch.enable_grad():
            loss = closure()
        for p, e in moved:
            p.sub_(e)
        self.base.step()
        return loss

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict):
        self.base.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True):
        self.base.zero_grad(set_to_none=set_to_none)


def build(model: torch.nn.Module, config: SAMConfig) -> torch.optim.Optimizer:
    keys = {"lr": config.lr, "weight_decay": config.weight_decay}
    base_entry = OPTIMIZERS.get(config.base)
    if issubclass(base_entry.config, AdamKeys):
        keys.update(betas=config.betas, eps=config.eps)
    base_config = OPTIMIZERS.make_config(config.base, f"optimizer ({config.method}) base",
                                         **{**keys, **config.base_params})
    return SAM(base_entry.hook("build")(model, base_config), config.rho,
               config.method == "asam", config.eta)


OPTIMIZERS.register("sam", SAMConfig, build=build)
OPTIMIZERS.register("asam", SAMConfig, build=build)
