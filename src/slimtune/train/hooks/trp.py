"""TRP (Xu et al. 2019/2020, "Trained Rank Pruning for Efficient Deep Neural Networks", IJCAI
2020): training alternates with low-rank approximation, and a nuclear-norm regulariser optimised
by stochastic sub-gradient descent pushes the weights towards low rank, so the trained network
can be decomposed afterwards with negligible loss and no fine-tuning.

For every targeted linear weight ``W = U·diag(σ)·Vᵀ`` (``[out, in]``):

    every ``every`` steps (after_step):   W ← U_k·diag(σ_1..σ_k)·V_kᵀ
        k = min{k : Σ_{i≤k} σ_i² ≥ energy·Σ_i σ_i²}   (or a fixed ``rank``)
    every step (after_backward):          ∇W ← ∇W + λ·U_k·V_kᵀ        (λ = ``nuclear``)

``U_k·V_kᵀ`` is a sub-gradient of ``||W||_*``. With ``subgradient: kept`` (default) ``k`` is the
truncation's rank, as the authors' released code (yuhuixu1993/Trained-Rank-Pruning,
``low_rank_approx``: ``torch.mm(N, C)`` of the truncated factors); ``subgradient: nonzero`` uses
every non-zero singular value (above ``max(m, n)·eps·σ_max``), the classical sub-gradient. The
defaults are the released code's: energy 0.9 (``EnergyThreshold(0.9)`` over σ²), ``every`` 5
(``train_TPR.sh``: ``-dp 5``), λ = 3e-4 (README: ``--nuclear-weight 0.0003``). Reported (the
paper, METHODS.md: CIFAR-10 and ImageNet; the README's table): ResNet-20 on CIFAR-10 at 2.17×
fewer FLOPs, 90.50% against 91.74%; ResNet-50 on ImageNet at 2.23×, top-1 72.69% (75.90%).

Differences, deliberate: the paper decomposes convolution kernels (channel or spatial form);
here a linear weight is one matrix (the channel form). The released code truncates at the start
of an iteration and adds the sub-gradient only on truncation iterations, from the truncation's
SVD; here the truncation comes after the optimiser steps whose count is a multiple of ``every``
(the same place: before the next forward), and the regulariser's sub-gradient is added at every
step from a fresh exact SVD of the current weight (it is a term of the loss). That is one SVD
per target per step while ``nuclear > 0``: on large models restrict ``target``. The gradient is
added before clipping, so clipping sees it; an unused weight (no task gradient) gets the
sub-gradient alone. Stateless: everything is recomputed from the weights, so a resumed run
continues exactly.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from slimtune.targets import check_target_spec
from slimtune.train.hooks.registry import (TRAINING_HOOKS, HookConfig, full_training_conflict,
                                           target_linears)
from slimtune.weights.rank_truncation import (kept_rank, nuclear_subgradient, spectrum,
                                              truncated)


class TRPConfig(HookConfig):
    """``method: trp`` -- target, every, energy or rank, nuclear (λ), subgradient, seed."""

    method: Literal["trp"] = "trp"
    target: Any = Field("all-linear", description="the linears to truncate and regularise")
    every: int = Field(5, ge=1, description="optimiser steps between truncations")
    energy: float = Field(0.9, gt=0, le=1, description="fraction of Σσ² the truncation keeps")
    rank: int | None = Field(None, ge=1, description="fixed truncation rank (instead of energy)")
    nuclear: float = Field(3e-4, ge=0, description="λ of the nuclear-norm regulariser (0: off)")
    subgradient: Literal["kept", "nonzero"] = Field(
        "kept", description="U·Vᵀ over the kept singular pairs or over every non-zero one")

    @field_validator("target")
    @classmethod
    def _target(cls, value: Any) -> Any:
        return check_target_spec(value)

    @model_validator(mode="after")
    def _energy_or_rank(self) -> "TRPConfig":
        if self.rank is not None and "energy" in self.model_fields_set:
            raise ValueError(f"give energy or rank, not both (got energy={self.energy}, "
                             f"rank={self.rank})")
        return self


def truncation_rank(S: torch.Tensor, config: TRPConfig) -> int:
    return kept_rank(S, config.energy, config.rank)


def subgradient(W: torch.Tensor, config: TRPConfig) -> torch.Tensor:
    """``λ·U_k·V_kᵀ`` of ``W`` (float32, or float64 for float64 weights)."""
    U, S, Vh = spectrum(W)
    k = None if config.subgradient == "nonzero" else truncation_rank(S, config)
    return config.nuclear * nuclear_subgradient(U, S, Vh, k)


def add_nuclear_subgradient(model: nn.Module, config: TRPConfig, step: int) -> None:
    """after_backward: add ``λ·U_k·V_kᵀ`` to every targeted weight's gradient."""
    if config.nuclear == 0:
        return
    for _, linear in target_linears(model, config.target, "trp"):
        W = linear.weight
        if not W.requires_grad:
            continue
        G = subgradient(W, config)
        if W.grad is None:
            W.grad = G.to(W.dtype)
        else:
            W.grad.add_(G.to(W.grad.dtype))


@torch.no_grad()
def truncate(model: nn.Module, config: TRPConfig, step: int, optimizer=None) -> None:
    """after_step: every ``every`` steps, replace each targeted weight by its truncated SVD."""
    if step % config.every:
        return
    for _, linear in target_linears(model, config.target, "trp"):
        U, S, Vh = spectrum(linear.weight)
        linear.weight.copy_(truncated(U, S, Vh, truncation_rank(S, config)))


def conflict(config: TRPConfig, adapter) -> str | None:
    return full_training_conflict("trp", "truncates and regularises whole linear weights",
                                  adapter)


TRAINING_HOOKS.register("trp", TRPConfig, after_backward=add_nuclear_subgradient,
                        after_step=truncate, conflict=conflict)
