"""Adam's moments and bias-corrected direction, for the optimisers that change what is done with
it (Cautious AdamW, Grams): one function each calls, never a base class."""
from __future__ import annotations

import math

import torch


def adam_direction(state: dict, grad: torch.Tensor, betas: tuple[float, float], eps: float
                   ) -> torch.Tensor:
    """Update Adam's moments in ``state`` with ``grad`` and return ``u = m̂ / (√v̂ + ε)`` (bias
    corrected, as ``torch.optim.AdamW``)."""
    if "exp_avg" not in state:
        state["step"], state["exp_avg"], state["exp_avg_sq"] = (0, torch.zeros_like(grad),
                                                                torch.zeros_like(grad))
    state["step"] += 1
    beta1, beta2 = betas
    m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
    return (m / (1 - beta1 ** t)) / denom


class AdamWithRule(torch.optim.Optimizer):
    """AdamW whose applied update is ``rule(u, g)`` instead of ``u`` (decoupled weight decay
    first, as ``torch.optim.AdamW``); the optimisers that only change the rule pass theirs."""

    def __init__(self, params, rule, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.rule = rule

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                u = adam_direction(self.state[p], p.grad, group["betas"], group["eps"])
                p.add_(self.rule(u, p.grad), alpha=-group["lr"])
        return loss


def projected_adam_step(state: dict, grad: torch.Tensor, group: dict
                        ) -> tuple[torch.Tensor, float]:
    """The moment update of GaLore's and Fira's AdamW (the transformers-AdamW form their
    reference code uses): ``(m / (√v + ε), lr · √(1 − β₂ᵗ) / (1 − β₁ᵗ))`` after updating the
    moments in ``state`` with ``grad`` (``state["step"]`` counted here)."""
    if "exp_avg" not in state:
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
    beta1, beta2 = group["betas"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    state["step"] = step = state.get("step", 0) + 1
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    return m / v.sqrt().add_(group["eps"]), step_size
