"""Fira (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?"): GaLore's projected AdamW plus the part of the gradient the projection throws
away, scaled like the low-rank update and with its growth limited:

    R = project(G),   ψ = m / (√v + ε)  (Adam in the r-space, as GaLore),
    φ = ‖ψ‖ / ‖R‖ per row (m ≥ n) or column,   S = (G − α·back(R)) ⊙ φ,
    S ← S / max(‖S‖ / ‖S_prev‖, γ) · γ   (norm-growth limiter, γ = ``limiter``),
    θ ← θ − lr_t · (α·back(ψ) + S) − lr·λ·θ

(lr_t: the bias-corrected step size). Following the authors' code (PyPI ``fira`` 1.0.2,
``FiraAdamW``): the residual subtracts the α-scaled back-projection, and ‖S_prev‖ is the
limited norm of the previous step. Keys as :mod:`.galore` (``scale`` is Fira's α, default 1.0
there). Equal to ``fira`` 1.0.2 (tests). Reported (METHODS.md): matches full-rank training
under a low-rank optimiser-state constraint.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from slimtune.targets import check_target_spec
from slimtune.train.optimizers.config import AdamKeys
from slimtune.train.optimizers.projected import (ProjectedAdamW, adapter_conflict,
                                                 projected_groups)
from slimtune.train.optimizers.registry import OPTIMIZERS
from slimtune.weights.gradient_projection import ProjType, project_back


class FiraConfig(AdamKeys):
    method: Literal["fira"] = "fira"
    eps: float = Field(1e-6, gt=0)
    rank: int = Field(128, ge=1, description="rank of the gradient projection")
    update_proj_gap: int = Field(200, ge=1, description="steps between projector refreshes")
    scale: float = Field(1.0, gt=0, description="α: scale of the projected-back update")
    proj_type: ProjType = "std"
    limiter: float = Field(1.01, gt=1, description="γ: most the residual's norm may grow per step")
    target: Any = Field("all-linear", description="the linears whose weights are projected")

    @field_validator("target")
    @classmethod
    def _target(cls, value: Any) -> Any:
        return check_target_spec(value)


def residual(full: torch.Tensor, low: torch.Tensor, adam: torch.Tensor, basis: torch.Tensor,
             side: str, scale: float) -> torch.Tensor:
    """``(G − α·back(R)) ⊙ φ`` with ``φ = ‖ψ‖ / ‖R‖`` along the low-rank side."""
    dim = 0 if adam.shape[0] < adam.shape[1] else 1
    factor = adam.norm(dim=dim) / (low.norm(dim=dim) + 1e-8)
    if dim == 1:
        factor = factor.unsqueeze(1)
    return (full - project_back(low, basis, side) * scale) * factor


def fira_update(p, state, low_grad, low_update, side, group) -> tuple[torch.Tensor, float]:
    """``α·back(ψ) + S``, S the residual after the norm-growth limiter (its limited norm kept
    in ``state`` for the next step)."""
    extra = residual(p.grad, low_grad, low_update, state["basis"], side, group["scale"])
    norm = extra.norm()
    if "residual_norm" in state:
        shrink = max(norm / (state["residual_norm"] + 1e-8), group["limiter"]) / group["limiter"]
        extra, norm = extra / shrink, norm / shrink
    state["residual_norm"] = norm
    return extra.add_(project_back(low_update, state["basis"], side), alpha=group["scale"]), 1.0


def build(model: torch.nn.Module, config: FiraConfig) -> torch.optim.Optimizer:
    groups = projected_groups(model, "fira", config.target, config.rank,
                              proj_type=config.proj_type, scale=config.scale,
                              update_proj_gap=config.update_proj_gap, limiter=config.limiter)
    return ProjectedAdamW(groups, fira_update, config.lr, config.betas, config.eps,
                          config.weight_decay)


def conflict(config, adapter) -> str | None:
    return adapter_conflict("fira", adapter)


OPTIMIZERS.register("fira", FiraConfig, build=build, conflict=conflict)
