"""The adapter-method registry and the config fields every adapter method shares.

A method is one module in ``slimtune/adapt/`` that defines a pydantic config (subclass of
:class:`AdapterConfig`) and plain functions, and registers them::

    register("pissa", PiSSAConfig, init_layer=init_layer)

- ``init_layer(name, linear, config, prepared) -> FactoredLinear`` (required): the adapted layer
  for one ``nn.Linear``; ``prepared`` is this layer's entry of ``prepare``'s result (or None).
- ``prepare(model, names, config, calib, progress) -> {name: object}`` (optional): data-driven
  work done before any layer is replaced (EVA's incremental SVD, CorDA's streamed covariances).
  ``calib`` is a LongTensor ``[n, seqlen]`` of token windows; ``progress`` shows or hides its
  progress bars. A method with ``prepare`` needs ``calib``.
- ``loss(model, config) -> Tensor`` (optional): a term added to the training loss (SORSA's
  orthonormal regulariser).
- ``after_step(model, config, step) -> None`` (optional): called by the training loop after every
  optimiser step (rank redistribution and similar schedules).

The scale of the low-rank part is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora: true``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimtune.recipe import check_target_spec


class AdapterConfig(BaseModel):
    """Fields every adapter method has: ``r``, ``alpha``, ``targets``, ``rslora``, ``seed``."""

    model_config = ConfigDict(extra="forbid")

    method: str
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    targets: str | list[str] = "all-linear"
    rslora: bool = False
    seed: int = 0

    @field_validator("targets")
    @classmethod
    def _targets(cls, value):
        return check_target_spec(value)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


@dataclass(frozen=True)
class Method:
    name: str
    config: type[AdapterConfig]
    init_layer: Callable
    prepare: Callable | None = None
    loss: Callable | None = None
    after_step: Callable | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.prepare is not None


_METHODS: dict[str, Method] = {}


def register(name: str, config: type[AdapterConfig], init_layer: Callable, *,
             prepare: Callable | None = None, loss: Callable | None = None,
             after_step: Callable | None = None) -> Method:
    if name in _METHODS and _METHODS[name].init_layer is not init_layer:
        raise ValueError(f"adapter method {name!r} is already registered")
    _METHODS[name] = Method(name, config, init_layer, prepare, loss, after_step)
    return _METHODS[name]


def known_methods() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown adapter method {name!r}; known: {', '.join(known_methods())}")
    return _METHODS[name]


def make_config(method: str, **params: Any) -> AdapterConfig:
    """Validate ``params`` for ``method``; errors name the method and the offending key."""
    from pydantic import ValidationError

    m = get_method(method)
    try:
        return m.config(method=method, **params)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                             for e in err.errors())
        raise ValueError(f"{method}: {problems}") from None
