"""IncreLoRA (Zhang, Li, Chen, Jiang, Wang, Qian 2023, "IncreLoRA: Incremental Parameter
Allocation Method for Parameter-Efficient Fine-tuning").

    ΔW = s·B·diag(Λ)·A,   A [r, in] ~ N(0, 0.02²),  B [out, r],  Λ = 0,   s = alpha / target_r
    active components: the first k_l of layer l (k_l = init_r at the start); activating j draws
    B[:, j] ~ N(0, 0.02²) (the columns of inactive components are 0)
    loss += orth_reg · mean over the 2·L matrices of ‖A_k A_kᵀ − I‖_F and ‖B_kᵀ B_k − I‖_F
    I_l = mean |Λ_k·∇Λ_k| + mean |A_k·∇A_k| + mean |B_k·∇B_k|     (active entries of layer l)
    Ī_l ← β1·Ī_l + (1 − β1)·I_l,   Ū_l ← β2·Ū_l + (1 − β2)·|I_l − Ī_l|,   S_l = Ī_l·Ū_l
    after step t > warmup with t % interval = 0, while Σ k_l < target_r·L:
        the top_h layers by S_l (with k_l < r) get add_r more components each

Every layer starts with a few ranks and the budget grows where the layers are most important,
until the average rank reaches ``target_r``. The paper reports higher parameter efficiency than
the baselines on GLUE (DeBERTaV3-base), significantly better in low-resource settings.

All r components are allocated up front (parameter shapes never change in training). An inactive
component has B's column and Λ at zero, so every gradient reaching it is exactly zero and it
stays inert under any optimiser, with no mask. Activating component j draws B's column j from a
generator seeded by (seed, layer, j); Λ_j is still 0, so the output is unchanged, and from the
next step Λ_j, then a_j and b_j, learn (the reference's new triplets start at Λ = 0 too). The
active counts and the averages live in ``slimtune.adapt.method_state``, so a resumed run is
exact; ``finish`` drops the components that were never activated.

Differences from the reference (FeiyuZhang98/IncreLoRA). It scores a layer by the dense update,
Σ|ΔW ⊙ ∂L/∂ΔW| / sqrt(out·in), which needs ΔW formed in every forward; here I_l is AdaLoRA's
|w·∇w| sensitivity of the factors, averaged over the layer's active triplets. It scales by
alpha / (current rank), so adding a rank changes every output; here s is fixed at
alpha / target_r, the reference's scale at the end of the allocation. Its "advance learning"
pre-trains reserve components with Λ = 1e-5 (the start is then not exact) and it restarts the
learning-rate warmup after each round; neither is done here.
"""
from __future__ import annotations

import math
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

INIT_STD = 0.02


class IncreLoRAConfig(AdapterConfig):
    """``method: increlora`` -- r (largest rank of a layer, allocated up front), alpha, targets,
    rslora, seed, init_r (active ranks at the start), target_r (average active rank when the
    allocation ends; default r // 2), add_r (ranks added to a chosen layer per round; default
    target_r // 2), top_h (layers chosen per round), warmup, interval (steps), beta1, beta2,
    orth_reg."""

    method: Literal["increlora"] = "increlora"
    init_r: int = Field(2, ge=1)
    target_r: int | None = Field(None, ge=1)
    add_r: int | None = Field(None, ge=1)
    top_h: int = Field(12, ge=1)
    warmup: int = Field(100, ge=0)
    interval: int = Field(100, ge=1)
    beta1: float = Field(0.85, gt=0, lt=1)
    beta2: float = Field(0.85, gt=0, lt=1)
    orth_reg: float = Field(0.1, ge=0)

    @model_validator(mode="after")
    def _ranks(self):
        if not self.init_r <= self.target <= self.r:
            raise ValueError(f"need init_r <= target_r <= r, got init_r={self.init_r}, "
                             f"target_r={self.target}, r={self.r}")
        return self

    @property
    def target(self) -> int:
        """The average rank the allocation ends at (default: half of r, at least init_r)."""
        return self.target_r or max(self.init_r, self.r // 2)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.target) if self.rslora else self.target)

    @property
    def ranks_per_round(self) -> int:
        """add_r (default: half of the target rank, the reference's table)."""
        return self.add_r or max(1, self.target // 2)


def new_column(name: str, j: int, n_out: int, seed: int, dtype) -> torch.Tensor:
    """B's column j of layer ``name``: N(0, 0.02²) from a generator seeded by (seed, name, j)."""
    g = layer_generator(seed, f"{name}/increlora/{j}")
    return torch.randn(n_out, generator=g, dtype=dtype) * INIT_STD


def init_layer(name: str, linear: nn.Linear, config: IncreLoRAConfig, prepared=None):
    dtype = compute_dtype(linear.weight)
    g = layer_generator(config.seed, name)
    A = torch.randn(config.r, linear.in_features, generator=g, dtype=dtype) * INIT_STD
    B = torch.zeros(linear.out_features, config.r, dtype=dtype)
    for j in range(config.init_r):
        B[:, j] = new_column(name, j, linear.out_features, config.seed, dtype)
    return adapted_linear(linear, A, B, config.scale, core=torch.zeros(config.r, dtype=dtype))


def schedule(model: nn.Module, config: IncreLoRAConfig) -> dict:
    """The schedule's state in ``method_state``: ``active`` (int64 [L]), ``importance`` and
    ``uncertainty`` (float64 [L]), in the sorted order of the adapted layers' names."""
    state = method_state(model)
    if "active" not in state:
        n = len(factored_layers(model))
        state["active"] = torch.full((n,), config.init_r, dtype=torch.long)
        state["importance"] = torch.zeros(n, dtype=torch.float64)
        state["uncertainty"] = torch.zeros(n, dtype=torch.float64)
    return state


def adapted(model: nn.Module) -> dict:
    """The adapted layers by name, in sorted order (the order of the schedule's tensors)."""
    layers = factored_layers(model)
    return {name: layers[name] for name in sorted(layers)}


def budget(model: nn.Module, config: IncreLoRAConfig) -> int:
    return config.target * len(factored_layers(model))


def orthogonal_loss(model: nn.Module, config: IncreLoRAConfig) -> torch.Tensor | None:
    """``orth_reg`` · mean over the active A_k, B_k of ‖A_k A_kᵀ − I‖_F, ‖B_kᵀ B_k − I‖_F
    (None when ``orth_reg`` is 0)."""
    if config.orth_reg == 0:
        return None
    active = schedule(model, config)["active"].tolist()
    terms = []
    for layer, k in zip(adapted(model).values(), active):
        for M in (layer.lowrank.A[:k], layer.lowrank.B[:, :k].mT):
            M = M.to(compute_dtype(M))
            eye = torch.eye(k, dtype=M.dtype, device=M.device)
            terms.append(torch.linalg.matrix_norm(M @ M.mT - eye))
    return config.orth_reg * torch.stack(terms).mean()


def sensitivity(layer, k: int) -> torch.Tensor:
    """I_l: the mean |w·∇w| over the active entries of Λ, A and B (0 without gradients), as a
    float64 scalar on the layer's device."""
    lr = layer.lowrank
    total = torch.zeros((), dtype=torch.float64, device=lr.A.device)
    for p, used in ((lr.core, lr.core[:k]), (lr.A, lr.A[:k]), (lr.B, lr.B[:, :k])):
        if p.grad is not None:
            grad = p.grad[:, :k] if p is lr.B else p.grad[:k]
            total += (used.to(compute_dtype(p)) * grad).abs().mean().double()
    return total


@torch.no_grad()
def update_importance(model: nn.Module, config: IncreLoRAConfig, step: int) -> None:
    """``after_backward``: fold the step's sensitivities into Ī and Ū (while budget is left)."""
    state = schedule(model, config)
    if int(state["active"].sum()) >= budget(model, config):
        return
    values = [sensitivity(layer, int(k)) for layer, k in
              zip(adapted(model).values(), state["active"])]
    now = torch.stack([v.to(values[0].device) for v in values]).cpu()  # one device sync
    state["importance"] = config.beta1 * state["importance"] + (1 - config.beta1) * now
    state["uncertainty"] = (config.beta2 * state["uncertainty"]
                            + (1 - config.beta2) * (now - state["importance"]).abs())


def chosen_layers(scores: torch.Tensor, active: torch.Tensor, r: int, top_h: int) -> list[int]:
    """The (up to) ``top_h`` layers with room left (k_l < r), highest score first (ties: the
    earlier layer)."""
    room = [i for i in range(len(scores)) if int(active[i]) < r]
    return sorted(room, key=lambda i: (-float(scores[i]), i))[:top_h]


def check_run(config: IncreLoRAConfig, steps: int) -> None:
    """The rank grows at least once in a run of ``steps`` steps (else it is a rank-init_r LoRA)."""
    first = (config.warmup // config.interval + 1) * config.interval
    if config.init_r < config.target and first > steps:
        raise ValueError(f"increlora: the rank never grows in {steps} steps: the first growth is "
                         f"at step {first} (after warmup={config.warmup}, every interval="
                         f"{config.interval} steps); lower warmup and interval")


@torch.no_grad()
def grow(model: nn.Module, config: IncreLoRAConfig, step: int, optimizer=None) -> None:
    """``after_step``: every ``interval`` steps after ``warmup``, add ``add_r`` components to
    each of the ``top_h`` most important layers, within the budget."""
    if step <= config.warmup or step % config.interval:
        return
    state = schedule(model, config)
    active = state["active"]
    left = budget(model, config) - int(active.sum())
    scores = state["importance"] * state["uncertainty"]
    layers = list(adapted(model).items())
    for i in chosen_layers(scores, active, config.r, config.top_h):
        add = min(config.ranks_per_round, config.r - int(active[i]), left)
        if add <= 0:
            break
        name, B = layers[i][0], layers[i][1].lowrank.B
        for j in range(int(active[i]), int(active[i]) + add):
            B[:, j] = new_column(name, j, B.shape[0], config.seed, compute_dtype(B)).to(B)
        active[i] += add
        left -= add


@torch.no_grad()
def drop_inactive(model: nn.Module, config: IncreLoRAConfig) -> None:
    """``finish``: rebuild every low-rank part with its active components only (same scale)."""
    active = schedule(model, config)["active"].tolist()
    for layer, k in zip(adapted(model).values(), active):
        lr = layer.lowrank
        if k < lr.rank:
            layer.lowrank = LowRank(lr.A[:k].clone(), lr.B[:, :k].clone(), lr.scale,
                                    lr.core[:k].clone())


METHODS.register("increlora", IncreLoRAConfig, init_layer=init_layer, loss=orthogonal_loss,
                 after_backward=update_importance, after_step=grow, finish=drop_inactive,
                 check_run=check_run)
