"""Checks of the layer-by-layer pipeline (:mod:`slimtune.calib.pipeline`): the steps before any
work, the calibration size, the activations between blocks."""
from __future__ import annotations

import torch
from torch import nn

from slimtune.calib.blocks import STAT_KINDS
from slimtune.progress import warn
from slimtune.targets import match_targets
from slimtune.weights.precision import all_finite

NEEDS = frozenset({"gram", "mean_abs", "fisher", "original"})


def check_finite(hidden: torch.Tensor, where: str) -> None:
    """``ValueError`` if calibration activations hold NaN or Inf (a broken model or step)."""
    if not all_finite(hidden):
        raise ValueError(f"the calibration activations after {where} contain NaN or Inf: the "
                         "model (or an earlier step) produces non-finite values on these inputs")


def warn_small_calibration(model: nn.Module, steps, per_step, windows: torch.Tensor) -> None:
    """Warn when a step that needs ``X^T X`` gets fewer calibration tokens than the widest
    input it targets: that Gram matrix is then rank-deficient and the results poor."""
    tokens = windows.numel()
    for k, (step, (needs, by_block)) in enumerate(zip(steps, per_step)):
        if "gram" not in needs:
            continue
        widths = {n: model.get_submodule(n).in_features for b in by_block for n in b}
        short = sorted((n for n, w in widths.items() if w > tokens), key=widths.get, reverse=True)
        if short:
            widest = widths[short[0]]
            windows_needed = -(-widest // windows.shape[1])
            warn(f"step {k} ({type(step).__name__}): {tokens} calibration tokens are fewer than "
                 f"the {widest} inputs of {len(short)} targeted layers (e.g. {short[0]}), so "
                 f"their Gram matrices are rank-deficient and the results will be poor; use at "
                 f"least {widest} tokens (e.g. {windows_needed} windows of {windows.shape[1]})")


def hooks_for(pairs) -> dict:
    """{name: kinds ⊆ STAT_KINDS} for the (names, needs) pairs that need input statistics."""
    hooks = {}
    for names, needs in pairs:
        for n in names if needs & STAT_KINDS else ():
            hooks[n] = hooks.get(n, frozenset()) | (needs & STAT_KINDS)
    return hooks


def validate_steps(model, steps, prefix: str, n_blocks: int):
    """Per step, per block, the target names; raises ValueError naming a bad step."""
    per_step = []
    for k, step in enumerate(steps):
        label = f"step {k} ({type(step).__name__})"
        if not callable(getattr(step, "apply", None)) or not hasattr(step, "targets"):
            raise ValueError(f"{label}: a step needs `targets` and an `apply(name, layer, stats)`")
        needs = frozenset(getattr(step, "needs", frozenset()))
        if needs - NEEDS:
            raise ValueError(f"{label}: unknown needs {sorted(needs - NEEDS)}; "
                             f"known: {sorted(NEEDS)}")
        try:
            names = match_targets(model, step.targets)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from err
        if not names:
            raise ValueError(f"{label}: targets {step.targets!r} match no linear layer in "
                             f"{type(model).__name__}")
        by_block = [[n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(n_blocks)]
        if not any(by_block):
            raise ValueError(f"{label}: targets {step.targets!r} match no linear inside the "
                             f"blocks '{prefix}' (matched only {names[:3]})")
        per_step.append((needs, by_block))
    return per_step
