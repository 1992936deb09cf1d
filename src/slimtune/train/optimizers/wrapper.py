"""What the optimisers that wrap a base optimiser share (SAM/ASAM, GAM, FSAM: each makes the
gradient the base steps with from extra gradient evaluations, through ``step(closure)``): the
keys ``base`` / ``base_params``, the base's build with the wrapper's own ``lr``,
``weight_decay`` (and ``betas``, ``eps`` for an Adam-based base), and :class:`Wrapper`, whose
state is the base's. A wrapper cannot be a base: its config subclasses :class:`WrapperKeys`, and
any base whose optimiser ``needs_closure`` is refused at build (the wrapper calls ``step()``)."""
from __future__ import annotations

import torch
from pydantic import Field, field_validator

from slimtune.train.optimizers.config import AdamKeys
from slimtune.train.optimizers.registry import OPTIMIZERS


def is_wrapper(name: str) -> bool:
    """Whether optimiser ``name`` wraps a base optimiser (its config has ``base``)."""
    return issubclass(OPTIMIZERS.get(name).config, WrapperKeys)


def base_names() -> list[str]:
    return [n for n in OPTIMIZERS.names() if not is_wrapper(n)]


class WrapperKeys(AdamKeys):
    base: str = Field("adamw", description="the optimiser that steps with the gradient made here")
    base_params: dict = Field(default_factory=dict, description="the base optimiser's own keys")

    @field_validator("base")
    @classmethod
    def _known_base(cls, value: str) -> str:
        bases = ", ".join(base_names())
        if value in OPTIMIZERS and is_wrapper(value):
            wrappers = ", ".join(n for n in OPTIMIZERS.names() if is_wrapper(n))
            raise ValueError(f"base optimizer {value!r} cannot be a base: it wraps a base "
                             f"optimizer itself (as {wrappers} do); valid bases: {bases}")
        if value not in OPTIMIZERS:
            raise ValueError(f"unknown base optimizer {value!r}; known: {bases}")
        return value


def base_conflict(config: WrapperKeys, adapter) -> str | None:
    """The base optimiser's reason not to train with ``adapter``'s method (its ``conflict``)."""
    entry = OPTIMIZERS.get(config.base)
    conflict = entry.hook("conflict")
    if conflict is None:
        return None
    keys = {"lr": config.lr, "weight_decay": config.weight_decay}
    if issubclass(entry.config, AdamKeys):
        keys.update(betas=config.betas, eps=config.eps)
    reason = conflict(OPTIMIZERS.make_config(config.base, f"optimizer ({config.method}) base",
                                             **{**keys, **config.base_params}), adapter)
    return None if reason is None else f"its base {config.base}: {reason}"


def build_base(model: torch.nn.Module, config: WrapperKeys) -> torch.optim.Optimizer:
    """The base optimiser over ``model``'s trainable parameters: the wrapper's ``lr`` and
    ``weight_decay`` (``betas``, ``eps`` too for an Adam-based base), ``base_params`` over them."""
    keys = {"lr": config.lr, "weight_decay": config.weight_decay}
    entry = OPTIMIZERS.get(config.base)
    if issubclass(entry.config, AdamKeys):
        keys.update(betas=config.betas, eps=config.eps)
    base_config = OPTIMIZERS.make_config(config.base, f"optimizer ({config.method}) base",
                                         **{**keys, **config.base_params})
    base = entry.hook("build")(model, base_config)
    if getattr(base, "needs_closure", False):
        raise ValueError(f"base optimizer {config.base!r} needs a closure of its own, which "
                         f"{config.method} cannot give it; valid bases: {', '.join(base_names())}")
    return base


class Wrapper(torch.optim.Optimizer):
    """Wraps ``base``: the same parameter-group dicts (so the lr schedule reaches it), and its
    state is the base's (``state_dict`` / ``load_state_dict`` / ``zero_grad`` go to it)."""

    needs_closure = True

    def __init__(self, base: torch.optim.Optimizer, defaults: dict):
        super().__init__(base.param_groups, defaults)
        self.base = base

    def pairs(self) -> list[tuple[torch.Tensor, dict]]:
        """``(parameter, its group)`` for every parameter with a gradient."""
        return [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict):
        self.base.load_state_dict(state_dict)
        # the base made new group dicts: share them again, or the schedule stops reaching it
        self.param_groups = self.base.param_groups

    def zero_grad(self, set_to_none: bool = True):
        self.base.zero_grad(set_to_none=set_to_none)

    @staticmethod
    def check_closure(closure, name: str, gradients: str) -> None:
        if closure is None:
            raise ValueError(f"{name} takes {gradients} gradients per step: call step(closure) "
                             "with a closure that recomputes the loss's gradients")

    def step_at(self, shifts: list[tuple[torch.Tensor, torch.Tensor]], closure) -> torch.Tensor:
        """Move each parameter by its shift, take the closure's gradients there, move back and
        step the base with them (the sharpness-aware update); the closure's loss."""
        for p, e in shifts:
            p.add_(e)
        with torch.enable_grad():
            loss = closure()
        for p, e in shifts:
            p.sub_(e)
        self.base.step()
        return loss


def global_norm(tensors) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together."""
    return torch.norm(torch.stack([t.norm() for t in tensors]))
