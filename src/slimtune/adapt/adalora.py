"""AdaLoRA (Zhang, Chen, Bukharin, Karampatziakis, He, Cheng, Chen, Zhao 2023, "Adaptive Budget
Allocation for Parameter-Efficient Fine-Tuning", ICLR 2023), with PEFT 0.21's semantics.

    ΔW = s·P·diag(Λ)·Q,   P [out, r], Λ [r], Q [r, in],   s = alpha / r   (PEFT: alpha / init_r)
    init:   P, Q ~ N(0, 0.02²),  Λ = 0                  (so the output at step 0 is the base's)
    loss += orth_reg_weight · mean over the 2·L matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F
    I(w) = |w · ∂L/∂w|                                   (every entry of P, Λ, Q)
    Ī ← β1·Ī + (1 − β1)·I,   Ū ← β2·Ū + (1 − β2)·|I − Ī|,   s(w) = Ī·Ū
    S_i = s(Λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)       (the score of triplet i)
    b(t) = b0                                            t ≤ tinit
         = ⌊(b0 − bT)·(1 − (t − tinit)/(T − tfinal − tinit))³ + bT⌋   tinit < t ≤ T − tfinal
         = bT                                            t > T − tfinal
    b0 = r·L, bT = target_r·L;  every deltaT steps (from the step after tinit): Λ_i = 0 for
    every triplet with S_i ≤ the (b0 − b(t))-th smallest score over all layers

It is a ``LowRank`` with a diagonal core: A = Q, B = P, core = Λ. Step t is PEFT's
``global_step`` (0 for the first step) and T is ``total_step`` (default: the training run's
length, which the training loop records in ``slimtune.adapt.method_state``). At step T − tfinal
the mask is set once more at the target budget, the averages are dropped, and from then on the
mask is fixed (masked Λ_i are zeroed after every step). The schedule runs in the training loop's
hooks: ``after_backward`` updates the averages, ``after_step`` masks, ``loss`` is the
regulariser, ``finish`` drops the masked triplets, so the saved adapter holds only the kept ranks
(:func:`rank_allocation` gives the rank per layer; the manifest records each layer's rank; a
layer may keep none: rank 0, left out of a PEFT export). The averages live in ``method_state``
(``sensitivity``, ``uncertainty``), so a resumed run is exact.

PEFT's MetaMathQA benchmark reports 37.3% GSM8K accuracy for AdaLoRA against 47.8% for LoRA; the
paper reports gains over LoRA on GLUE, SQuAD and XSum, largest at low budgets.

Deliberate differences from PEFT:

- Timing of the importance. PEFT's ``update_and_allocate`` is called by the user after
  ``optimizer.step()`` and reads the updated weight with the step's (clipped) gradient,
  I = |w_{t+1}·g_t|, then masks. Here ``after_backward`` reads the weight the gradient belongs to,
  I = |w_t·g_t| (the paper's formula), before gradient clipping; the masking is the same, after
  the optimiser step (``after_step``).
- A masked triplet's P_i and Q_i are frozen (``LowRank.grad_scale`` is the mask: 0 masked,
  1 kept); PEFT lets them move (their loss gradient is ∝ Λ_i, so only the regulariser, weight
  decay and Λ_i's drift between maskings move them). Λ_i keeps training, so a masked triplet can
  come back at a later masking, as in PEFT.
- The scale is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora``), PEFT's ``alpha / (r + 1e-5)``.
- The averages are kept in float32 (float64 for float64 weights), PEFT's in the weight's dtype.
- ``r`` is PEFT's ``init_r`` (also readable as ``config.init_r``); the paper squares the Frobenius
  norms and sums them over layers, PEFT (and the authors' code) averages the norms: this is PEFT.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from slimtune.adapt.api import method_state
from slimtune.adapt.factors import adapted_linear, layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import LowRank
from slimtune.targets import factored_layers
from slimtune.weights.precision import compute_dtype

PARTS = ("A", "B", "core")  # Q, P, Λ


class AdaLoRAConfig(AdapterConfig):
    """``method: adalora`` -- r (PEFT's init_r: every layer's starting rank), target_r (the
    average rank at the end), tinit / tfinal (steps before and after the budget phase), deltaT
    (steps between maskings), beta1 / beta2 (smoothing of sensitivity / uncertainty, in (0, 1)),
    orth_reg_weight (>= 0), total_step (None: the training run's length), alpha, rslora, targets,
    seed (of P and Q)."""

    method: Literal["adalora"] = "adalora"
    target_r: int = Field(8, ge=1, description="average rank per layer at the end")
    tinit: int = Field(0, ge=0, description="steps before the budget starts to fall")
    tfinal: int = Field(0, ge=0, description="steps at the target budget with a fixed mask")
    deltaT: int = Field(1, ge=1, description="steps between two maskings")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonal regulariser")
    total_step: int | None = Field(None, ge=1, description="steps of the run (None: the loop's)")

    @model_validator(mode="after")
    def _schedule(self):
        if self.target_r > self.r:
            raise ValueError(f"target_r={self.target_r} exceeds r={self.r} (init_r): a budget "
                             "schedule that ends above its start")
        if self.total_step is not None:
            check_phases(self, self.total_step)
        return self

    @property
    def init_r(self) -> int:
        return self.r


def check_run(config: AdaLoRAConfig, steps: int) -> None:
    """The phases fit a run of ``steps`` steps (total_step where set, else the run's length)."""
    check_phases(config, config.total_step or steps)


def check_phases(config: AdaLoRAConfig, total: int) -> None:
    if config.tinit + config.tfinal >= total:
        raise ValueError(f"tinit={config.tinit} + tfinal={config.tfinal} must be below "
                         f"total_step={total}: the schedule leaves no budgeting phase")


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: AdaLoRAConfig, prepared=None):
    n_out, n_in = linear.weight.shape
    g = layer_generator(config.seed, name)
    Q = torch.randn(config.r, n_in, generator=g) * 0.02
    P = torch.randn(n_out, config.r, generator=g) * 0.02
    layer = adapted_linear(linear, Q, P, config.scale, core=torch.zeros(config.r))
    layer.lowrank.grad_scale = torch.ones(config.r, dtype=linear.weight.dtype,
                                          device=linear.weight.device)
    return layer


def orthogonal_regulariser(model: nn.Module, config: AdaLoRAConfig) -> torch.Tensor | None:
    """``orth_reg_weight`` times the mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F over the layers'
    2·L factors (PEFT's ``AdaLoraModel.forward``); None when the weight is 0."""
    if config.orth_reg_weight == 0:
        return None
    norms = []
    for layer in factored_layers(model).values():
        Q, P = layer.lowrank.factors()
        for M in (Q, P.mT):  # rows of Q, columns of P
            M = M.to(compute_dtype(M))
            gram = M @ M.mT
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            norms.append(torch.linalg.matrix_norm(gram - eye))
    if not norms:
        raise ValueError("adalora: the model has no adapted layers")
    return config.orth_reg_weight * torch.stack(norms).mean()


def total_steps(model: nn.Module, config: AdaLoRAConfig) -> int:
    """T: ``config.total_step``, else the run's length recorded by the training loop."""
    total = config.total_step or method_state(model).get("total_steps")
    if total is None:
        raise ValueError("adalora: the budget schedule needs total_step: set it in the config, "
                         "or train with slimtune.train (which records the run's length)")
    check_phases(config, int(total))
    return int(total)


def budget_schedule(step: int, init_budget: int, target_budget: int, config: AdaLoRAConfig,
                    total: int) -> tuple[int, bool]:
    """``(b(step), whether step masks)`` (PEFT's ``RankAllocator.budget_schedule``)."""
    if step <= config.tinit:
        return init_budget, False
    if step > total - config.tfinal:
        return target_budget, True
    fraction = 1 - (step - config.tinit) / (total - config.tfinal - config.tinit)
    budget = int((init_budget - target_budget) * fraction ** 3 + target_budget)
    return budget, step % config.deltaT == 0


@torch.no_grad()
def update_importance(model: nn.Module, config: AdaLoRAConfig, step: int) -> None:
    """``after_backward``: fold the step's sensitivities |w·∂L/∂w| into the averages (every step
    before T − tfinal)."""
    if step >= total_steps(model, config) - config.tfinal:
        return
    state = method_state(model)
    sens, unc = state.setdefault("sensitivity", {}), state.setdefault("uncertainty", {})
    for name, layer in factored_layers(model).items():
        for part in PARTS:
            p = getattr(layer.lowrank, part)
            key = f"{name}.lowrank.{part}"
            w = p.detach().to(compute_dtype(p))
            ipt = (w * p.grad.to(w.dtype)).abs() if p.grad is not None else torch.zeros_like(w)
            if key not in sens:
                sens[key], unc[key] = torch.zeros_like(w), torch.zeros_like(w)
            sens[key] = config.beta1 * sens[key] + (1 - config.beta1) * ipt
            unc[key] = config.beta2 * unc[key] + (1 - config.beta2) * (ipt - sens[key]).abs()


def triplet_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """S_i of every layer (``[r]`` each) from the averages in ``method_state``."""
    state = method_state(model)
    sens, unc = state.get("sensitivity", {}), state.get("uncertainty", {})
    scores = {}
    for name in factored_layers(model):
        keys = [f"{name}.lowrank.{part}" for part in PARTS]
        if any(k not in sens for k in keys):
            raise ValueError(f"adalora: no importance scores for {name} yet (the training loop's "
                             "after_backward hook computes them before the first masking)")
        Q, P, E = (sens[k] * unc[k] for k in keys)
        scores[name] = E + (Q.mean(dim=1) + P.mean(dim=0))
    return scores


@torch.no_grad()
def mask_to_budget(model: nn.Module, budget: int) -> None:
    """Keep the triplets scoring above the (b0 − budget)-th smallest score; zero the others' Λ_i
    and freeze their P_i, Q_i (``grad_scale``)."""
    layers = factored_layers(model)
    scores = triplet_scores(model)
    k = sum(layer.lowrank.rank for layer in layers.values()) - budget
    threshold = (torch.kthvalue(torch.cat([s.cpu() for s in scores.values()]), k).values
                 if k > 0 else None)
    for name, layer in layers.items():
        lr = layer.lowrank
        keep = (torch.ones_like(scores[name], dtype=torch.bool) if threshold is None
                else scores[name] > threshold.to(scores[name].device))
        lr.core.masked_fill_(~keep.to(lr.core.device), 0.0)
        lr.grad_scale.copy_(keep)


def allocate(model: nn.Module, config: AdaLoRAConfig, step: int, optimizer=None) -> None:
    """``after_step``: after optimiser step ``step`` (PEFT's global_step ``step - 1``), mask to
    the budget, set the final mask at T − tfinal, then keep the masked Λ_i at zero."""
    if step <= 0:
        return
    t, total = step - 1, total_steps(model, config)
    layers = factored_layers(model)
    start = sum(layer.lowrank.rank for layer in layers.values())
    target = config.target_r * len(layers)
    if t < total - config.tfinal:
        budget, mask_now = budget_schedule(t, start, target, config, total)
        if mask_now:
            mask_to_budget(model, budget)
    elif t == total - config.tfinal:
        mask_to_budget(model, budget_schedule(t, start, target, config, total)[0])
        state = method_state(model)  # PEFT's reset_ipt: the final phase scores nothing
        for key in ("sensitivity", "uncertainty"):
            state.pop(key, None)
    else:
        with torch.no_grad():
            for layer in layers.values():
                lr = layer.lowrank
                lr.core.masked_fill_(lr.grad_scale == 0, 0.0)


def rank_allocation(model: nn.Module) -> dict[str, int]:
    """The rank each adapted layer keeps: its unmasked triplets (its rank after ``finish``)."""
    ranks = {}
    for name, layer in factored_layers(model).items():
        c = layer.lowrank.grad_scale
        ranks[name] = layer.lowrank.rank if c is None else int((c != 0).sum())
    return ranks


@torch.no_grad()
def drop_masked(model: nn.Module, config: AdaLoRAConfig) -> None:
    """``finish``: rebuild every low-rank part with its kept triplets only (same scale, no
    ``grad_scale``), so the saved adapter holds only the allocated ranks."""
    for layer in factored_layers(model).values():
        lr = layer.lowrank
        if lr.grad_scale is None:
            continue
        keep = (lr.grad_scale != 0).nonzero().flatten()
        layer.lowrank = LowRank(lr.A[keep].clone(), lr.B[:, keep].clone(), lr.scale,
                                lr.core[keep].clone(), train_A=lr.A.requires_grad,
                                train_B=lr.B.requires_grad, train_core=lr.core.requires_grad)


METHODS.register("adalora", AdaLoRAConfig, init_layer=init_layer, loss=orthogonal_regulariser,
                 after_backward=update_importance, after_step=allocate, finish=drop_masked,
                 check_run=check_run)
