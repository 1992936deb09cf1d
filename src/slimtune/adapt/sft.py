"""SFT, sparse fine-tuning by SpIEL (Ansell, Vulić, Sterz, Korhonen, Ponti 2024, "Scaling
Sparse Fine-Tuning to Large Language Models"), its accumulated-gradient variant SpIEL-AG.

    W' = W + Σ_{i ∈ η} δ_i·e_i,   |η| = k = ⌊density·out·in⌋ per layer, fixed
    start:  η = k positions uniformly at random, δ = 0
    every step: the k deltas δ train
    after steps t = γ, S + γ, 2S + γ, ...  (S = update_every, γ = accumulate):
        g = Σ_{τ = t-γ+1..t} ∇_W L_τ                    (the dense gradient, accumulated)
        n = ⌊p_t·k⌋,  p_t = 1 at t = γ (the random η is replaced wholesale),
                      else p_t = drop·(1 - t/T)  (T: the run's steps; linear decay to 0)
        drop  the n entries with the smallest |δ_i| (they changed least; their deltas go to 0)
        grow  the n positions ∉ the remaining η with the largest |g_i|, with δ_i = 0 and their
              optimiser state zeroed; a dropped position that is regrown stays as it was

k never changes, so the optimiser sees one value vector per layer throughout; an entry's slot
in it changes only when its position is replaced (``SparseDelta.indices``, saved with the
adapter). The paper reports that SFT often beats LoRA on instruction tuning of LLaMA 2 7B/13B
at a comparable run time (no single number; METHODS.md lists none).

The dense gradient is formed on the γ steps before an update only: ``before_step`` sets
``requires_grad`` on the layer's frozen base weight for those steps, ``after_backward`` adds
``base.weight.grad`` (in float32) into ``method_state`` and switches it off again. A window step
costs one extra ∇Yᵀ·X per layer and a float32 sum of the weight's size (which a checkpoint
inside a window carries); the other S - γ steps form no gradient for the weight. Under DDP each
step's gradient is averaged over the processes before it is added, so every process picks the
same positions. The schedule is a function of the step number and ``method_state``, so an
interrupted run resumes exactly, inside a window too.

Differences from the reference code (AlanAnsell/peft, ``tuners/sft``): it keeps running sums
only for the k largest first-step gradients as candidates (memory) and initialises a regrown
entry's Adam moments from the accumulated gradients; here every inactive position is a
candidate and a regrown entry's optimiser state is zero (any optimiser, not only its own
AdamW/SM3). Its SM3-momentum variant (SpIEL-MA) is not implemented. Defaults are the
reference's: density 0.01, S = 100, γ = 5, drop 0.2. ``r``, ``alpha`` and ``rslora`` are
accepted but not used.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import nn

from slimtune.adapt.api import method_state
from slimtune.adapt.factors import layer_generator, reset_optimizer_entries
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import FactoredLinear, SparseDelta
from slimtune.targets import factored_layers
from slimtune.weights.sparse_support import (check_support_size, drop_and_regrow, random_support,
                                             support_size)

PREFIX = "sft/gradient/"


class SFTConfig(AdapterConfig):
    """``method: sft`` -- targets, seed, density (fraction of each weight's entries trained,
    (0, 1]), update_every (S, steps between drop-and-regrow, >= 1), accumulate (γ, steps of
    gradient summed before each, 1..S), drop (initial fraction of k replaced, decaying linearly
    to 0, [0, 1]), regrow_all_first (the first update replaces the whole random support); r,
    alpha and rslora are ignored."""

    method: Literal["sft"] = "sft"
    density: float = Field(0.01, gt=0, le=1)
    update_every: int = Field(100, ge=1)
    accumulate: int = Field(5, ge=1)
    drop: float = Field(0.2, ge=0, le=1)
    regrow_all_first: bool = True

    @model_validator(mode="after")
    def _window(self):
        if self.accumulate > self.update_every:
            raise ValueError(f"accumulate={self.accumulate} exceeds update_every="
                             f"{self.update_every}: gradients are summed over the steps before "
                             "each update")
        return self


def check_layer(config: SFTConfig, name: str, linear: nn.Linear) -> None:
    check_support_size("sft", "density", config.density, name, tuple(linear.weight.shape))


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: SFTConfig, prepared=None):
    check_layer(config, name, linear)
    W = linear.weight
    k = support_size(config.density, *W.shape)
    indices = random_support(W.numel(), k, layer_generator(config.seed, name)).to(W.device)
    sparse = SparseDelta(tuple(W.shape), indices, torch.zeros(k, dtype=W.dtype, device=W.device))
    return FactoredLinear.from_linear(linear, sparse=sparse)


def replaced_fraction(t: int, config: SFTConfig, total: int | None) -> float:
    """p_t: the fraction of k replaced after optimiser step ``t`` (0 when no update is due)."""
    if t < config.accumulate or (t - config.accumulate) % config.update_every:
        return 0.0
    if t == config.accumulate and config.regrow_all_first:
        return 1.0
    if total is None:
        return config.drop
    return config.drop * max(0.0, 1 - t / total)


def update_step(step: int, config: SFTConfig) -> int:
    """The update step whose window holds step number ``step`` (1-based), or 0."""
    if (step - 1) % config.update_every >= config.accumulate:
        return 0
    return (step - 1) // config.update_every * config.update_every + config.accumulate


def _layers(model: nn.Module) -> dict[str, FactoredLinear]:
    return {n: layer for n, layer in factored_layers(model).items() if not layer.merged}


def before_step(model: nn.Module, config: SFTConfig, step: int) -> None:
    """Open the gradient window for step ``step + 1`` if it precedes an update that replaces
    entries."""
    t = update_step(step + 1, config)
    if t and replaced_fraction(t, config, method_state(model).get("total_steps")) > 0:
        for layer in _layers(model).values():
            layer.base.weight.requires_grad_(True)


@torch.no_grad()
def after_backward(model: nn.Module, config: SFTConfig, step: int) -> None:
    """Add the step's dense weight gradient to the window's sums and close the window."""
    state = method_state(model)
    for name, layer in _layers(model).items():
        weight = layer.base.weight
        if not weight.requires_grad:
            continue
        grad = weight.grad
        weight.grad = None
        weight.requires_grad_(False)
        if grad is None:
            continue
        grad = grad.float() if grad.dtype != torch.float64 else grad
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
        key = PREFIX + name
        state[key] = grad if key not in state else state[key].add_(grad)


@torch.no_grad()
def after_step(model: nn.Module, config: SFTConfig, step: int, optimizer=None) -> None:
    """After optimiser step ``step``: drop and regrow where an update is due."""
    state = method_state(model)
    p = replaced_fraction(step, config, state.get("total_steps"))
    if p == 0:
        return
    for name, layer in _layers(model).items():
        gradient = state.pop(PREFIX + name, None)
        if gradient is None:
            continue
        sparse = layer.sparse
        n = int(p * sparse.nnz)
        indices, changed = drop_and_regrow(sparse.indices, sparse.values.abs(), gradient.abs(),
                                           n)
        sparse.indices.copy_(indices)
        sparse.values[changed] = 0
        reset_optimizer_entries(optimizer, sparse.values, changed)


def finish(model: nn.Module, config: SFTConfig) -> None:
    """Training ended: drop a window's partial sums and close it."""
    state = method_state(model)
    for name, layer in _layers(model).items():
        state.pop(PREFIX + name, None)
        layer.base.weight.requires_grad_(False)


METHODS.register("sft", SFTConfig, init_layer=init_layer, check_layer=check_layer,
                 before_step=before_step, after_backward=after_backward,
                 after_step=after_step, finish=finish)
