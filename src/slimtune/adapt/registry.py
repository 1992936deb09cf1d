"""The adapter-method registry and the config fields every adapter method shares.

A method is one module in ``slimtune/adapt/`` that defines a pydantic config (subclass of
:class:`AdapterConfig`) and plain functions, and registers them at the bottom of its file in
:data:`METHODS` (a :class:`slimtune.registry.Registry`)::

    METHODS.register("pissa", PiSSAConfig, init_layer=init_layer)

- ``init_layer(name, linear, config, prepared) -> FactoredLinear`` (required): the adapted layer
  for one ``nn.Linear``; ``prepared`` is this layer's entry of ``prepare``'s result (or None).
- ``prepare(model, names, config, calib, progress) -> {name: object}`` (optional): data-driven
  work done before any layer is replaced (EVA's incremental SVD, CorDA's streamed covariances).
  ``calib`` is a LongTensor ``[n, seqlen]`` of token windows; ``progress`` shows or hides its
  progress bars. A method with ``prepare`` needs ``calib``.
- ``plan(model, names, config) -> {name: object}`` (optional): data-free work over all targets
  before any layer is replaced (VeRA's shared projection shape, a rank budget); its entry is
  ``init_layer``'s ``prepared`` (a method has ``prepare`` or ``plan``, not both).
- ``loss(model, config) -> Tensor | None`` (optional): a term added to the training loss (SORSA's
  orthonormal regulariser); the loop calls it after each micro-batch's forward, so it may read
  that forward's outputs through forward hooks the method registered (BA-LoRA).
- ``before_step(model, config, step) -> None`` (optional): called by the training loop before
  the step's first forward (DyLoRA draws the step's rank); ``step`` is the number of steps done
  before this one, so a draw seeded by it resumes exactly.
- ``after_backward(model, config, step) -> None`` (optional): called by the training loop once
  the step's gradients exist, before clipping and the optimiser step (importance scores that
  read gradients, gradient rescaling); ``step`` is the number of steps done before this one.
- ``after_step(model, config, step, optimizer) -> None`` (optional): called by the training loop
  after every optimiser step (rank redistribution and similar schedules); ``optimizer`` is the
  loop's (None outside it), so a method that re-selects entries can reset their state.
- ``finish(model, config) -> None`` (optional): called once when training ends, before the
  adapter is written (drop pruned ranks so the saved adapter is smaller).

State a schedule keeps between steps (importance averages, accumulated gradients) lives in
``slimtune.adapt.method_state(model)``, a dict of tensors the training loop saves with every
checkpoint and restores on resume; it is never written into the adapter.
- ``check_layer(config, name, linear) -> None`` (optional): raise ``ValueError`` for a target the
  method's settings do not fit (a density that keeps no entry); :func:`slimtune.adapt.apply` runs
  it on every target before the model changes, the CLI on the weightless model before loading
  (read only shapes).
- ``check_run(config, steps) -> None`` (optional): raise ``ValueError`` for a schedule that does
  not fit a training run of ``steps`` optimiser steps (AdaLoRA's phases, IncreLoRA's first
  growth); the training loop's checks run it before any model loads.

A config whose layers deliberately do not start at the base model's output (a pretraining
parameterisation that replaces the weight, as SLTrain's default) overrides :attr:`exact_start`.

The scale of the low-rank part is ``alpha / r`` (``alpha / sqrt(r)`` with ``rslora: true``).
"""
from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimtune.registry import Entry, Registry
from slimtune.targets import check_target_spec

METHODS = Registry("adapter method", required=("init_layer",),
                   optional=("prepare", "plan", "loss", "before_step", "after_backward",
                             "after_step", "finish", "check_layer", "check_run"))


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

    @property
    def exact_start(self) -> bool:
        """Whether the adapted model's output at step 0 equals the base model's."""
        return True

    def rank_limit(self, n_out: int, n_in: int) -> int:
        """The largest ``r`` a ``n_out x n_in`` layer takes (``apply`` refuses more)."""
        return min(n_out, n_in)


def known_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> Entry:
    return METHODS.get(name)


def needs_calibration(name: str) -> bool:
    """Whether method ``name`` is data-driven (has a ``prepare`` hook that needs ``calib``)."""
    return METHODS.get(name).hook("prepare") is not None


def make_config(method: str, **params: Any) -> AdapterConfig:
    """Validate ``params`` for ``method``; errors read ``adapter (<method>): <key>: <problem>``."""
    return METHODS.make_config(method, "adapter", **params)
