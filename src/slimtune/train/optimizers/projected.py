"""What GaLore and Fira share (each calls these; neither imports the other): which weights get a
projected gradient, and the projection with its periodic refresh kept in the optimiser state."""
from __future__ import annotations

import torch

from slimtune.targets import match_targets
from slimtune.train.optimizers.config import trainable
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
