"""The training-hook registry: training methods that change how a model trains without being a
parameterisation of its layers (TRP's truncation, group-sparsity proximal steps, temporary
forgetting of the embeddings, the weight compander's reparameterisation).

A hook is one file with a pydantic config (subclass of :class:`HookConfig`) and plain
functions, registered at the bottom of its file::

    TRAINING_HOOKS.register("trp", TRPConfig, after_backward=add_nuclear_subgradient,
                            after_step=truncate)

The loop (:mod:`slimtune.train.loop`) calls, for every hook of ``TrainConfig.hooks`` in order:

- ``setup(model, config)``: once, on the model to train (adapter applied, or every parameter
  unfrozen for full training), before a checkpoint's weights are restored on it and before the
  optimiser is built (a reparameterisation registers its parameters here);
- ``after_backward(model, config, step)``: after the step's gradients exist, before clipping
  (``step`` counts optimiser steps done so far: 0 at the first);
- ``after_step(model, config, step, optimizer)``: after every optimiser step (``step`` = steps
  done, 1 after the first); may change weights and the optimiser's state of the parameters it
  changes;
- ``finish(model, config)``: before the final result is written (a reparameterisation
  materialises its weights).

All hooks are optional. Hooks keep no state of their own between calls: what they draw comes
from generators seeded by ``(config.seed, step)``, so a resumed run continues exactly.
``conflict(config, adapter) -> str | None`` (optional) says why the hook cannot run with an
adapter method (``adapter`` is its config, or None for full training) before anything loads.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import nn

from slimtune.registry import Registry
from slimtune.targets import match_targets

TRAINING_HOOKS = Registry("training hook", optional=(
    "setup", "after_backward", "after_step", "finish", "conflict"))


class HookConfig(BaseModel):
    """``method`` and ``seed``; unknown keys are errors that list the known ones."""

    model_config = ConfigDict(extra="forbid")

    method: str
    seed: int = 0


def run_hooks(hooks: list[tuple[object, BaseModel]], event: str, *args) -> None:
    """Call ``event`` of every ``(entry, config)`` of ``hooks`` that has it."""
    for entry, config in hooks:
        fn = entry.hook(event)
        if fn is not None:
            fn(args[0], config, *args[1:])


def target_linears(model: nn.Module, target, hook: str) -> list[tuple[str, nn.Linear]]:
    """``(name, nn.Linear)`` of every linear ``target`` selects (a target spec as elsewhere:
    ``slimtune.targets.match_targets``); a ``ValueError`` naming the hook when none is."""
    names = match_targets(model, target)
    if not names:
        raise ValueError(f"hook {hook}: target {target!r} matches no linear layer of "
                         f"{type(model).__name__}")
    return [(name, model.get_submodule(name)) for name in names]


def full_training_conflict(hook: str, needs: str, adapter) -> str | None:
    """The ``conflict`` reason of a hook that changes weights an adapter method freezes (None for
    full training, ``adapter is None``)."""
    if adapter is None:
        return None
    return (f"{hook} {needs}, which adapter method {adapter.method!r} freezes: use {hook} with "
            "full training (--method full)")
