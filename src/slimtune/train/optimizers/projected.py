"""What GaLore and Fira share (each calls these; neither imports the other): which weights get a
projected gradient, the projection with its periodic refresh kept in the optimiser state, and
the projected AdamW step, into which each passes its rule for the full-size update."""
from __future__ import annotations

import torch

from slimtune.targets import match_targets
from slimtune.train.optimizers.config import trainable
from slimtune.train.optimizers.moments import projected_adam_step
from slimtune.weights.gradient_projection import orthogonal_basis, project, projection_side


def projected_groups(model: torch.nn.Module, method: str, target, rank: int,
                     **projection) -> list[dict]:
    """Two parameter groups: every trainable parameter but the targeted linears' weights, and
    those weights with ``rank`` and the ``projection`` keys (a rank larger than a weight allows
    is an error naming it)."""
    params = trainable(model)
    projected = []
    for name in match_targets(model, target):
        weight = model.get_submodule(name).weight
        if weight.requires_grad:
            if rank > min(weight.shape):
                raise ValueError(f"{method}: rank {rank} exceeds what {name} "
                                 f"{list(weight.shape)} allows ({min(weight.shape)})")
            projected.append(weight)
    if not projected:
        raise ValueError(f"{method}: no trainable linear weight matches target {target!r}")
    chosen = {id(p) for p in projected}
    groups = [{"params": [p for p in params if id(p) not in chosen]},
              {"params": projected, "rank": rank, **projection}]
    return [g for g in groups if g["params"]]


def projected_gradient(state: dict, grad: torch.Tensor, group: dict
                       ) -> tuple[torch.Tensor, str]:
    """``(R, side)``: the gradient projected on the basis in ``state``, which is (re)computed
    from this gradient at step 0 and every ``update_proj_gap`` steps."""
    side = projection_side(tuple(grad.shape), group["proj_type"])
    if "basis" not in state or state.get("step", 0) % group["update_proj_gap"] == 0:
        state["basis"] = orthogonal_basis(grad, group["rank"], side)
    return project(grad, state["basis"], side), side


class ProjectedAdamW(torch.optim.Optimizer):
    """The transformers-form AdamW GaLore's and Fira's reference code use, with the gradient of
    every group that carries ``rank`` projected (:func:`projected_gradient`) and the r-space
    update turned into the full one by ``full_update(p, state, low_grad, low_update, side,
    group) -> (update, factor)`` — the method's own rule; the parameter moves by ``-step_size ·
    factor · update`` (a constant factor costs no pass over the full-size update). Decoupled
    weight decay after the step, as the references."""

    def __init__(self, groups: list[dict], full_update, lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float):
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.full_update = full_update

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state, grad = self.state[p], p.grad
                if "rank" in group:
                    grad, side = projected_gradient(state, grad, group)
                update, step_size = projected_adam_step(state, grad, group)
                if "rank" in group:
                    update, factor = self.full_update(p, state, grad, update, side, group)
                    step_size *= factor
                p.add_(update, alpha=-step_size)
                if group["weight_decay"] > 0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def adapter_conflict(name: str, adapter) -> str | None:
    """Why a projected optimiser cannot train an adapter method's layers (None for full
    training): it projects the gradients of whole ``nn.Linear`` weights, and an adapter method
    freezes those and trains its own small factors instead."""
    if adapter is None:
        return None
    return (f"{name} projects the gradients of whole linear weights, and adapter method "
            f"{adapter.method!r} freezes them (it trains its own rank-{adapter.r} factors): use "
            f"{name} with full training (--method full), or another optimiser (adamw) with "
            f"{adapter.method}")
