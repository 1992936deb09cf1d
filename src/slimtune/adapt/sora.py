"""SoRA (Ding, Lv, Wang, Chen, Liu, Zhou, Sun 2023, "Sparse Low-rank Adaptation of Pre-trained
Language Models", EMNLP 2023).

    ΔW = s·B·diag(g)·A,   A ~ U(-1/sqrt(in), 1/sqrt(in)),  B = 0,  g ~ N(0, 1),  s = alpha / r
    after every optimiser step:   g ← sign(g)·max(|g| − η_t·λ_t, 0)      (proximal step of λ‖g‖₁)
    end of training:              drop every component i with g_i = 0

The gate g sits between the factors as the low-rank part's diagonal core; B = 0 makes the start
exact. η_t is the learning rate of the optimiser step just taken; λ_t is ``lambda``, or rises
linearly from ``lambda`` to ``lambda_end`` over the run (the paper's sparsifying scheduler, which
raises λ in stages between further training rounds, compressed into one run). ``finish``
rebuilds every layer with its non-zero gates only, so layers end with different ranks and the
saved adapter is smaller; a layer whose gates are all zero keeps one component (gate 0, so
ΔW = 0) so that every adapted layer keeps a low-rank part (load, PEFT export and ``use_rank``
need rank ≥ 1). The paper reports SoRA keeping "70% retained parameters and 70% training time"
of LoRA's at comparable or better GLUE scores.

Differences from the reference (TsinghuaC3I/SoRA). Its gates have their own AdamW (no weight
decay) whose threshold is a fixed 3e-4 per step (GLUE script, lr 8e-4); here the gates train in
the loop's optimiser with everything else (its weight decay applies) and the threshold is the
paper's η_t·λ. The default λ = 0.375 is that script's threshold over its learning rate. The loop
steps the learning-rate schedule before ``after_step``, so η_t is the rate recorded at the
previous call (the first step, with none recorded, uses the next step's rate). Outside the
training loop (no optimiser) ``after_step`` does nothing.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field
from torch import nn

from slimtune.adapt.api import method_state
from slimtune.adapt.factors import adapted_linear, kaiming_uniform_A, layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import LowRank
from slimtune.targets import factored_layers
from slimtune.weights.precision import compute_dtype


class SoRAConfig(AdapterConfig):
    """``method: sora`` -- r, alpha, targets, rslora, seed, lambda (λ of the proximal step,
    >= 0), lambda_end (λ at the last step: linear schedule; None: constant λ)."""

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    method: Literal["sora"] = "sora"
    lambda_: float = Field(0.375, ge=0, alias="lambda")
    lambda_end: float | None = Field(None, ge=0)


def init_layer(name: str, linear: nn.Linear, config: SoRAConfig, prepared=None):
    dtype = compute_dtype(linear.weight)
    g = layer_generator(config.seed, name)
    A = kaiming_uniform_A(config.r, linear.in_features, g, dtype, "cpu")
    gate = torch.randn(config.r, generator=g, dtype=dtype)
    B = torch.zeros(linear.out_features, config.r, dtype=dtype)
    return adapted_linear(linear, A, B, config.scale, core=gate)


def soft_threshold(g: torch.Tensor, tau: float) -> torch.Tensor:
    """``sign(g)·max(|g| − τ, 0)``: the proximal operator of ``τ·‖g‖₁``."""
    return torch.sign(g) * (g.abs() - tau).clamp_min(0)


def lambda_at(config: SoRAConfig, step: int, total: int | None) -> float:
    """λ after optimiser step ``step`` of ``total``."""
    if config.lambda_end is None or not total:
        return config.lambda_
    return config.lambda_ + (config.lambda_end - config.lambda_) * min(step / total, 1.0)


@torch.no_grad()
def proximal_step(model: nn.Module, config: SoRAConfig, step: int, optimizer=None) -> None:
    """``after_step``: the proximal L1 step on every gate, with η the learning rate its step
    used. The loop has already moved the schedule on when this runs, so the rate the optimiser
    holds now is recorded (``method_state["gate_lr"]``) for the next call; the first call, with
    nothing recorded, uses the current rate."""
    if optimizer is None:
        return
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    state = method_state(model)
    used = state.get("gate_lr", {})
    lam = lambda_at(config, step, state.get("total_steps"))
    now = {}
    for name, layer in factored_layers(model).items():
        gate = layer.lowrank.core
        if id(gate) in lr_of:
            now[name] = lr_of[id(gate)]
            gate.copy_(soft_threshold(gate, used.get(name, now[name]) * lam))
    state["gate_lr"] = now


def kept_ranks(model: nn.Module) -> dict[str, int]:
    """The number of non-zero gates of every adapted layer (its rank after ``finish``, at
    least 1)."""
    return {name: max(1, int((layer.lowrank.core != 0).sum()))
            for name, layer in factored_layers(model).items()}


@torch.no_grad()
def drop_zero_gates(model: nn.Module, config: SoRAConfig) -> None:
    """``finish``: rebuild every low-rank part with its non-zero gates only (same scale)."""
    for layer in factored_layers(model).values():
        lr = layer.lowrank
        keep = (lr.core != 0).nonzero().flatten()
        if keep.numel() == lr.rank:
            continue
        if keep.numel() == 0:
            keep = keep.new_zeros(1)
        layer.lowrank = LowRank(lr.A[keep].clone(), lr.B[:, keep].clone(), lr.scale,
                                lr.core[keep].clone())


METHODS.register("sora", SoRAConfig, init_layer=init_layer, after_step=proximal_step,
                 finish=drop_zero_gates)
