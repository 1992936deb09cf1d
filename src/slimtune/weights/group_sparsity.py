"""Group soft-thresholding of a weight matrix to a preset number of non-zero groups.

The groups of ``W`` ``[out, in]`` are its rows (``dim=1`` norms: one per output unit) or its
columns (``dim=0``: one per input feature). The proximal operator of ``τ·Σ_g ||W_g||_2`` (the
group lasso) is the group soft-threshold

    prox_τ(W)_g = max(0, 1 − τ / ||W_g||) · W_g                  (:func:`group_soft_threshold`)

which zeroes every group with ``||W_g|| <= τ`` and shrinks the others by ``τ`` in norm. The
smallest ``τ`` that leaves at most ``k`` non-zero groups is the ``(k+1)``-th largest group norm
(0 when there are at most ``k`` groups): :func:`threshold_for_active`. Ties at that norm are
zeroed together, so fewer than ``k`` groups can stay when norms tie.
"""
from __future__ import annotations

import math

import torch

from slimtune.weights.precision import compute_dtype

GROUP_DIM = {"rows": 1, "columns": 0}  # the dimension summed over to get one norm per group


def group_norms(W: torch.Tensor, groups: str) -> torch.Tensor:
    """L2 norm of every row (``groups="rows"``) or column (``"columns"``) of ``W``, in float32
    (float64 for float64 input)."""
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(W.shape)}")
    return torch.linalg.vector_norm(W.to(compute_dtype(W)), dim=GROUP_DIM[groups])


def active_count(n_groups: int, active: float | int) -> int:
    """Groups to keep: an int ``active`` is a number (capped at ``n_groups``), a float in
    ``(0, 1]`` a fraction, rounded down, at least 1."""
    if isinstance(active, bool) or active <= 0:
        raise ValueError(f"active must be a positive fraction or number, got {active!r}")
    if isinstance(active, int):
        return min(active, n_groups)
    if active > 1:
        raise ValueError(f"a fraction of groups must be in (0, 1], got {active}")
    return max(1, min(n_groups, math.floor(active * n_groups + 1e-9)))


def annealed_count(n_groups: int, target: int, step: int, steps: int | None) -> int:
    """The count at ``step`` when it goes linearly from ``n_groups`` (step 0) to ``target`` (step
    ``steps`` and after); ``steps=None``: ``target`` at once."""
    if steps is None or step >= steps:
        return target
    return n_groups - math.floor((n_groups - target) * step / steps)


def threshold_for_active(norms: torch.Tensor, k: int) -> float:
    """The smallest ``τ`` with at most ``k`` of ``norms`` above it: the ``(k+1)``-th largest."""
    if k >= norms.numel():
        return 0.0
    return float(torch.topk(norms, k + 1).values[-1])


def group_soft_threshold(W: torch.Tensor, tau: float, groups: str,
                         norms: torch.Tensor | None = None) -> torch.Tensor:
    """``prox_τ(W)`` over the groups (see the module docstring), in ``W``'s dtype; ``norms``:
    :func:`group_norms` of ``W`` when already computed."""
    norms = group_norms(W, groups) if norms is None else norms
    # (‖g‖ − τ)₊ / ‖g‖: exactly 0 for a group at the threshold (1 − τ/‖g‖ need not be)
    scale = (norms - tau).clamp_min(0) / norms.clamp_min(torch.finfo(norms.dtype).tiny)
    scale = scale[:, None] if groups == "rows" else scale[None, :]
    return (W.to(scale.dtype) * scale).to(W.dtype)
