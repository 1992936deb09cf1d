"""Group sparsity with a preset number of active groups, after WGSEF (Refael, Arbel & Huleihel
2023/2024, "Learning k-Level Structured Sparse Neural Networks Using Group Envelope
Regularization").

The paper trains with a Weighted Group Sparse Envelope Function regulariser by proximal gradient
steps; its property is that the number of non-zero groups (neurons, channels, ...) at
convergence is preset. What slimtune implements is the simplest proximal scheme with that
property, not WGSEF's own proximal operator: the groups of every targeted linear ``W`` ``[out,
in]`` are its rows (``groups: rows``, one per output unit; the bias is not part of the group) or
its columns (``groups: columns``, one per input feature), and after every optimiser step

    W_g ← max(0, 1 − τ / ||W_g||₂)·W_g,     τ = the (k+1)-th largest ||W_g||₂ of that W

the group soft-threshold (the proximal step of the group lasso ``τ·Σ_g ||W_g||₂``) with the
smallest threshold that leaves at most ``k`` non-zero groups (:mod:`slimtune.weights.
group_sparsity`; tied norms at ``τ`` all go, so ties can leave fewer). ``k`` is per weight:
``active`` as an int is a number of groups, as a float in ``(0, 1]`` a fraction of them (rounded
down, at least 1). With ``steps`` the count is annealed: ``k_t = G − ⌊(G − k)·t / steps⌋`` after
step ``t`` (every group at the start, ``k`` from step ``steps`` on), so the groups are removed
gradually instead of at the first step. Zeroed groups can grow back from their gradient (the
optimiser's state is left as it is); the next proximal step removes the weakest groups again.
The abstract (seeds/003) reports negligible accuracy loss, or gains, with redundant parameters
and faster inference; METHODS.md lists no number. Stateless (the count is a function of the
step), so a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from slimtune.targets import check_target_spec
from slimtune.train.hooks.registry import (TRAINING_HOOKS, HookConfig, full_training_conflict,
                                           target_linears)
from slimtune.weights.group_sparsity import (active_count, annealed_count, group_norms,
                                             group_soft_threshold, threshold_for_active)


class GroupSparsityConfig(HookConfig):
    """``method: group_sparsity`` -- target, groups (rows | columns), active (a number of groups
    or a fraction), steps (annealing), seed."""

    method: Literal["group_sparsity"] = "group_sparsity"
    target: Any = Field("all-linear", description="the linears whose groups are thresholded")
    groups: Literal["rows", "columns"] = "rows"
    active: int | float = Field(0.5, description="groups left non-zero in each weight: a number "
                                "(int >= 1) or a fraction in (0, 1]")
    steps: int | None = Field(None, ge=1, description="steps over which the active count goes "
                              "from every group down to active (None: at once)")

    @field_validator("target")
    @classmethod
    def _target(cls, value: Any) -> Any:
        return check_target_spec(value)

    @field_validator("active")
    @classmethod
    def _active(cls, value: int | float) -> int | float:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"a number of groups must be >= 1, got {value}")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ValueError(f"a fraction of groups must be in (0, 1] (a number of groups is "
                             f"an int), got {value}")
        return value


def kept_groups(n_groups: int, config: GroupSparsityConfig, step: int) -> int:
    """How many groups of a weight with ``n_groups`` stay non-zero after step ``step``."""
    return annealed_count(n_groups, active_count(n_groups, config.active), step, config.steps)


@torch.no_grad()
def proximal_step(model: nn.Module, config: GroupSparsityConfig, step: int,
                  optimizer=None) -> None:
    """after_step: group soft-threshold every targeted weight to at most ``k`` non-zero groups."""
    for _, linear in target_linears(model, config.target, "group_sparsity"):
        W = linear.weight
        norms = group_norms(W, config.groups)
        tau = threshold_for_active(norms, kept_groups(norms.numel(), config, step))
        if tau > 0:
            W.copy_(group_soft_threshold(W, tau, config.groups, norms))


def conflict(config: GroupSparsityConfig, adapter) -> str | None:
    return full_training_conflict("group_sparsity", "thresholds the groups of whole linear "
                                  "weights", adapter)


TRAINING_HOOKS.register("group_sparsity", GroupSparsityConfig, after_step=proximal_step,
                        conflict=conflict)
