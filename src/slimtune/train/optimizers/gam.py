"""GAM (Zhang et al., CVPR 2023, "Gradient Norm Aware Minimization Seeks First-Order Flatness
and Improves Generalization"): besides the loss, GAM minimises the first-order flatness
R⁽¹⁾_ρ(θ) = ρ · max_{‖δ‖≤ρ} ‖∇L(θ + δ)‖ (the largest gradient norm within radius ρ, which
bounds the Hessian's top eigenvalue at a minimum and SAM's sharpness term). This is the paper's
Algorithm 2 ("Accelerated GAM", Appendix D; the version of the authors' code), in which
∇‖∇L‖ is the finite difference of two gradients, so a step takes four gradients of the same
batch (ξ = 1e-12):

    g₀ = ∇L(θ)
    g₁ = ∇L(θ + ρ′·g₀/(‖g₀‖ + ξ))                          (ascent on the loss)
    h₀ = g₁ − g₀                                            (≈ ρ′ · ∇‖∇L(θ)‖)
    θ₂ = θ + ρ·h₀/(‖h₀‖ + ξ);   g₂ = ∇L(θ₂)                 (ascent on the gradient norm)
    g₃ = ∇L(θ₂ + ρ′·g₂/(‖g₂‖ + ξ))
    h₊ = α·g₁ + (1 − α)·g₃,   h₋ = β·g₀ + (1 − β)·g₂
    h₋⊥ = h₋ − (⟨h₋, h₊⟩ / (‖h₊‖² + ξ)) · h₊              (h₋'s part orthogonal to h₊)
    θ ← base step from θ with the gradient h₊ − γ·h₋⊥

(the box writes the SGD step θ − η(h₊ − γ·h₋⊥); like SAM here and the authors' code, any
base optimiser steps with that gradient). Norms and the inner product are global over the
trainable parameters. Defaults ρ = 0.2, ρ′ = 0.02, α = 0.6, β = 0.5, γ = 0.03: the authors'
setting for ResNets on CIFAR-100 (their code, main_cifar.py; CIFAR-10 uses ρ′ = 0.03,
α = β = 0.1, γ = 0.05). One deviation of that code from the box, not followed: it takes
h₋ = g₀ + (1 − β)·g₂. Equal to the update written from the box (tests). The authors report
that GAM improves the generalisation of models trained with SGD and AdamW on various data sets
and networks (CIFAR, ImageNet), and helps SAM find flatter minima that generalise better.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from slimtune.train.optimizers.registry import OPTIMIZERS
from slimtune.train.optimizers.wrapper import (Wrapper, WrapperKeys, base_conflict, build_base,
                                              global_norm)

XI = 1e-12


class GAMConfig(WrapperKeys):
    method: Literal["gam"] = "gam"
    rho: float = Field(0.2, gt=0, description="ρ: radius of the ascent on the gradient norm")
    rho_prime: float = Field(0.02, gt=0, description="ρ′: radius of the two ascents on the loss "
                                                     "(the finite difference of ∇‖∇L‖)")
    alpha: float = Field(0.6, ge=0, le=1, description="h₊ = α·g₁ + (1 − α)·g₃")
    beta: float = Field(0.5, ge=0, le=1, description="h₋ = β·g₀ + (1 − β)·g₂")
    gamma: float = Field(0.03, ge=0, description="weight of h₋'s part orthogonal to h₊")


def gradients_at(closure, params: list[torch.Tensor], shifts: list[torch.Tensor]):
    """``(loss, gradients)`` at θ + shift: the closure's loss and the gradients it leaves (taken
    from the parameters, which keep none; a parameter without one gets zeros); θ restored."""
    for p, s in zip(params, shifts):
        p.add_(s)
    with torch.enable_grad():
        loss = closure()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p, s in zip(params, shifts):
        p.sub_(s)
        p.grad = None
    return loss, grads


class GAM(Wrapper):
    """Wraps ``base`` (:class:`~.wrapper.Wrapper`: its parameter groups, its state)."""

    def __init__(self, base: torch.optim.Optimizer, rho: float, rho_prime: float, alpha: float,
                 beta: float, gamma: float):
        super().__init__(base, {"rho": rho, "rho_prime": rho_prime, "alpha": alpha,
                                "beta": beta, "gamma": gamma})

    @torch.no_grad()
    def step(self, closure=None):
        self.check_closure(closure, "gam", "four")
        pairs = self.pairs()
        params, groups = [p for p, _ in pairs], [g for _, g in pairs]
        g0 = [p.grad for p in params]
        for p in params:
            p.grad = None
        norm = global_norm(g0) + XI
        _, g1 = gradients_at(closure, params, [g * (gr["rho_prime"] / norm)
                                               for g, gr in zip(g0, groups)])
        h0 = [a - b for a, b in zip(g1, g0)]
        h_minus = [g.mul_(gr["beta"]) for g, gr in zip(g0, groups)]
        h_plus = [g.mul_(gr["alpha"]) for g, gr in zip(g1, groups)]
        norm = global_norm(h0) + XI
        shift = [h.mul_(gr["rho"] / norm) for h, gr in zip(h0, groups)]
        _, g2 = gradients_at(closure, params, shift)
        norm = global_norm(g2) + XI
        for s, g, h, gr in zip(shift, g2, h_minus, groups):
            s.add_(g * (gr["rho_prime"] / norm))
            h.add_(g, alpha=1 - gr["beta"])
        del g2
        loss, g3 = gradients_at(closure, params, shift)
        for h, g, gr in zip(h_plus, g3, groups):
            h.add_(g, alpha=1 - gr["alpha"])
        del g3, shift
        inner = sum((a * b).sum() for a, b in zip(h_minus, h_plus))
        coef = inner / (global_norm(h_plus) ** 2 + XI)
        for p, hp, hm, gr in zip(params, h_plus, h_minus, groups):
            p.grad = hp - gr["gamma"] * (hm - coef * hp)
        self.base.step()
        return loss


def build(model: torch.nn.Module, config: GAMConfig) -> torch.optim.Optimizer:
    return GAM(build_base(model, config), config.rho, config.rho_prime, config.alpha,
               config.beta, config.gamma)


OPTIMIZERS.register("gam", GAMConfig, build=build, conflict=base_conflict)
