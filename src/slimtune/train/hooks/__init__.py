"""Training hooks by name (:data:`.registry.TRAINING_HOOKS`, one file each): training methods
that are not a layer parameterisation. ``make_hooks(specs)`` validates a list of
``{"method": name, **keys}`` dicts into ``[(entry, config)]``; importing this package registers
every built-in hook once."""
from __future__ import annotations

from slimtune.train.hooks.registry import TRAINING_HOOKS, HookConfig, run_hooks
from slimtune.train.hooks import (group_sparsity, temporary_forgetting, trp,  # noqa: F401
                                  weight_compander)  # (importing registers them)

__all__ = ["TRAINING_HOOKS", "HookConfig", "make_hooks", "run_hooks"]


def make_hooks(specs: list[dict]) -> list[tuple[object, HookConfig]]:
    """``[(entry, validated config)]`` for ``specs``; one error naming every bad key."""
    made = []
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("method", None)
        if name not in TRAINING_HOOKS:
            raise ValueError(TRAINING_HOOKS.unknown(name))
        made.append((TRAINING_HOOKS.get(name), TRAINING_HOOKS.make_config(name, "hook", **spec)))
    return made
