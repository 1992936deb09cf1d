"""Weight compander (Cakaj, Mehnert & Yang 2023, "Weight Compander: A Simple Weight
Reparameterization for Regularization"; seeds/003, 004): every targeted weight is
trained through a fixed nonlinear reparameterisation ``w = f(v)`` that bounds the weights'
magnitude and forces them away from zero, so no single weight dominates and more weights take
part ("a more democratic decision-making"). The authors report that it improves generalisation on
top of standard regularisers (METHODS.md lists no number).

slimtune's compander (:mod:`slimtune.weights.compander`) is

    w = f(v) = b·tanh(g·v / b),     b = ``bound``·max|w₀| (per weight),   g = ``gain`` = f'(0)

odd and increasing, ``|w| < b`` always (large weights are compressed towards the bound) and,
with ``g > 1``, small ones expanded away from zero (a step on ``v`` moves ``w`` by ``g`` times
as much near zero, by ``g·(1 − (w/b)²)`` times elsewhere). Deliberate differences: only the
abstracts were available here, so ``f`` is a compander with the two properties they state, not
necessarily the paper's own formula; its hyperparameters are fixed, not learned (the paper's
extension); and the bound is relative to each pretrained weight's largest entry (``bound`` > 1)
so that ``f`` is invertible on it and fine-tuning starts exactly from the pretrained model.

``setup`` registers ``f`` with ``torch.nn.utils.parametrize`` on each target's ``weight``:
``v = f⁻¹(w₀) = (b/g)·atanh(w₀/b)`` (computed in float64) becomes the trained parameter
(``...parametrizations.weight.original``, what checkpoints hold) and the start equals the
pretrained weights to float rounding. ``finish`` removes the parametrisation, leaving plain
``nn.Linear`` weights ``w = f(v)``, so the result is an ordinary Hugging Face model. A weight
shared with another module (a tied LM head) is refused. Stateless: ``b`` is recomputed from the
base model when a run resumes, and the checkpoint restores ``v``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator
from torch import nn
from torch.nn.utils import parametrize

from slimtune.targets import check_target_spec
from slimtune.train.hooks.registry import (TRAINING_HOOKS, HookConfig, full_training_conflict,
                                           target_linears)
from slimtune.weights.compander import bound_for, compand, compand_inverse


class WeightCompanderConfig(HookConfig):
    """``method: weight_compander`` -- target, bound (× each weight's max |w|), gain (f'(0))."""

    method: Literal["weight_compander"] = "weight_compander"
    target: Any = Field("all-linear", description="the linears whose weights are companded")
    bound: float = Field(2.0, gt=1, description="|w| < bound·max|w₀| of each weight")
    gain: float = Field(2.0, gt=0, description="slope of f at zero (> 1 expands small weights)")

    @field_validator("target")
    @classmethod
    def _target(cls, value: Any) -> Any:
        return check_target_spec(value)


class Compander(nn.Module):
    """The parametrisation ``v -> f(v)`` with its ``right_inverse`` ``w -> f⁻¹(w)``."""

    def __init__(self, bound: float, gain: float):
        super().__init__()
        self.bound, self.gain = bound, gain

    def forward(self, v):
        return compand(v, self.bound, self.gain)

    def right_inverse(self, w):
        return compand_inverse(w, self.bound, self.gain)

    def extra_repr(self) -> str:
        return f"bound={self.bound:.4g}, gain={self.gain:.4g}"


def _check_not_shared(model: nn.Module, name: str, linear: nn.Linear) -> None:
    if parametrize.is_parametrized(linear, "weight"):
        raise ValueError(f"hook weight_compander: {name}.weight is already parametrised")
    owners = [n for n, p in model.named_parameters(remove_duplicate=False) if p is linear.weight]
    if len(owners) > 1:
        raise ValueError(f"hook weight_compander: {name}.weight is shared ({', '.join(owners)}): "
                         "leave tied weights out of the target")


def setup(model: nn.Module, config: WeightCompanderConfig) -> None:
    """Train every targeted weight as ``v`` with ``w = f(v)``, starting at ``v = f⁻¹(w₀)``."""
    linears = target_linears(model, config.target, "weight_compander")
    for name, linear in linears:
        _check_not_shared(model, name, linear)
    for _, linear in linears:
        compander = Compander(bound_for(linear.weight, config.bound), config.gain)
        parametrize.register_parametrization(linear, "weight", compander)


def companded_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose ``weight`` is parametrised by a :class:`Compander`."""
    return [m for m in model.modules() if parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, Compander) for p in m.parametrizations.weight)]


def finish(model: nn.Module, config: WeightCompanderConfig) -> None:
    """Replace each parametrisation by its value: plain weights ``w = f(v)``."""
    for module in companded_modules(model):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def conflict(config: WeightCompanderConfig, adapter) -> str | None:
    return full_training_conflict("weight_compander", "reparameterises whole linear weights",
                                  adapter)


TRAINING_HOOKS.register("weight_compander", WeightCompanderConfig, setup=setup, finish=finish,
                        conflict=conflict)
