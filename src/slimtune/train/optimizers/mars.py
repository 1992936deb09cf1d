"""MARS (Yuan et al. 2024, "MARS: Unleashing the Power of Variance Reduction for Training Large
Models"): a preconditioned optimiser fed a variance-reduced gradient (scaled stochastic
recursive momentum). This is MARS-AdamW, the approximate version ("MARS-approx", the authors'
default): the previous step's gradient stands in for the old weights' gradient on the new
batch, so a step takes one gradient. For each matrix (2-D parameter), with g_t its gradient:

    c_t = g_t + γ · β₁/(1 − β₁) · (g_t − g_{t−1})      (g₀ = 0: the first step scales g₁)
    c̃_t = c_t / ‖c_t‖ if ‖c_t‖ > 1 else c_t            (‖·‖: this parameter's Frobenius norm)
    m_t = β₁·m + (1 − β₁)·c̃_t,   v_t = β₂·v + (1 − β₂)·c̃_t²
    θ ← θ − lr·λ·θ − lr · (m_t / (1 − β₁ᵗ)) / (√(v_t / (1 − β₂ᵗ)) + ε)

Every other parameter (biases, norms; also any parameter that is not 2-D) takes plain AdamW in
the same form with ``betas_1d`` on its gradient, lr · lr_1d / lr and weight decay
``weight_decay_1d`` (``optimize_1d``: MARS for those too, with the matrices' keys).

Semantics and defaults follow the authors' reference (AGI-Arena/MARS, MARS/optimizers/mars.py,
``mars_type="mars-adamw"``, ``is_approx=True``): v_t is the moment of the clipped c̃_t (not of
g_t as the README's formula reads), the bias corrections and the decoupled decay as above,
betas (0.95, 0.99), γ = 0.025, ε = 1e-8, lr 3e-3, optimize_1d False, betas_1d (0.9, 0.95).
Two defaults differ, for fine-tuning under the training loop's schedule and weight decay: the
reference's lr_1d is an absolute 3e-3 (its default lr, so a ratio of 1) and its
weight_decay_1d is 0.1; here they default to the lr and weight_decay in force (set them to
match the reference). ``betas`` are MARS's own (this config is not AdamKeys), so the training
config's AdamW betas do not replace (0.95, 0.99). Equal to the update written from these
formulas (tests; also checked against the reference file). The authors report MARS beating
AdamW by a large margin on GPT-2 pre-training (their README, OpenWebText best validation loss
at 50B tokens: GPT-2 large 2.518 vs AdamW's 2.561, small 2.849 vs 2.885).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator

from slimtune.train.optimizers.config import OptimizerConfig, betas_in_range, trainable
from slimtune.train.optimizers.registry import OPTIMIZERS


class MARSConfig(OptimizerConfig):
    method: Literal["mars"] = "mars"
    lr: float = Field(3e-3, gt=0, description="learning rate (the loop's schedule scales it)")
    betas: tuple[float, float] = (0.95, 0.99)
    eps: float = Field(1e-8, gt=0)
    gamma: float = Field(0.025, ge=0, description="strength of the gradient correction")
    optimize_1d: bool = Field(False, description="MARS for the parameters that are not matrices "
                                                 "too (False: AdamW for them)")
    betas_1d: tuple[float, float] = Field((0.9, 0.95), description="AdamW's betas for the "
                                          "parameters that are not matrices")
    lr_1d: float | None = Field(None, gt=0, description="their peak lr (None: lr)")
    weight_decay_1d: float | None = Field(None, ge=0, description="their decoupled weight "
                                          "decay (None: weight_decay)")

    @field_validator("betas", "betas_1d")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        return betas_in_range(value)


def adamw_update(p: torch.Tensor, state: dict, update_input: torch.Tensor, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """AdamW's moments on ``update_input`` and its step on ``p`` (decay first)."""
    beta1, beta2 = betas
    state["step"] += 1
    m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
    m.mul_(beta1).add_(update_input, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(update_input, update_input, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
    p.mul_(1 - lr * weight_decay)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def corrected_gradient(state: dict, grad: torch.Tensor, beta1: float, gamma: float
                       ) -> torch.Tensor:
    """``c̃_t``, the clipped variance-reduced gradient; remembers ``g_t`` for the next step."""
    c = grad + (grad - state["last_grad"]) * (gamma * beta1 / (1 - beta1))
    state["last_grad"].copy_(grad)
    return c.div_(torch.linalg.vector_norm(c).clamp(min=1.0))


class MARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, gamma: float, optimize_1d: bool,
                 betas_1d: tuple[float, float], lr_1d_ratio: float, weight_decay_1d: float):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay, "gamma": gamma,
                                  "optimize_1d": optimize_1d, "betas_1d": betas_1d,
                                  "lr_1d_ratio": lr_1d_ratio,
                                  "weight_decay_1d": weight_decay_1d})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                mars = group["optimize_1d"] or p.ndim == 2
                if "exp_avg" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if mars:
                        state["last_grad"] = torch.zeros_like(p)
                if mars:
                    c = corrected_gradient(state, p.grad, group["betas"][0], group["gamma"])
                    adamw_update(p, state, c, group["lr"], group["betas"], group["eps"],
                                 group["weight_decay"])
                else:
                    adamw_update(p, state, p.grad, group["lr"] * group["lr_1d_ratio"],
                                 group["betas_1d"], group["eps"], group["weight_decay_1d"])
        return loss


def build(model: torch.nn.Module, config: MARSConfig) -> torch.optim.Optimizer:
    ratio = 1.0 if config.lr_1d is None else config.lr_1d / config.lr
    decay_1d = config.weight_decay if config.weight_decay_1d is None else config.weight_decay_1d
    return MARS(trainable(model), config.lr, config.betas, config.eps, config.weight_decay,
                config.gamma, config.optimize_1d, config.betas_1d, ratio, decay_1d)


OPTIMIZERS.register("mars", MARSConfig, build=build)
