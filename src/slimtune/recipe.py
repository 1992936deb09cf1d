"""Compression recipes: a YAML list of steps, validated in full before any model is loaded.

A recipe file is a YAML list of steps, or a mapping whose only key ``steps`` holds that list::

    - method: svd_llm        # a registered method (see known_methods())
      targets: all-linear    # 'all-linear', a list of name suffixes, or a regex on full names
      ratio: 0.8             # fraction of the targeted parameters KEPT (0 < ratio < 1)
      allocation: uniform    # uniform | welore | sensitivity

``ratio`` never means "removed": a rank-``k`` factorisation of an ``out x in`` matrix keeps
``k*(out + in)`` of its ``out*in`` parameters, and uniform allocation gives every matrix
``k = rank_for_ratio(out, in, ratio) = floor(ratio*out*in/(out + in))``.

- :func:`load_recipe` parses and validates a path, YAML text, or an already-parsed list/mapping and
  returns one pydantic config per step. Every problem (unknown method, unknown or ill-typed
  parameter, ratio outside (0, 1), empty or ill-formed targets) is a :class:`RecipeError` naming
  the step index (counting from 0, as the pipeline's report does), the method and the key, e.g.
  ``step 2 (svd_llm): ratio: must be in (0, 1), got 1.5``.
- :func:`check_targets` (after the model is loaded): every step's targets match some linear.
- :func:`build_steps` turns configs into pipeline steps.
- :func:`register` adds a method: ``@register("name", NameConfig)`` on ``build(config) -> step``.
  Importing this module registers the built-in methods (``slimtune.compress.*``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimtune.targets import match_targets


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the step, method and key."""


# -- registry ---------------------------------------------------------------------------------
_METHODS: dict[str, tuple[type[BaseModel], Callable]] = {}


def register(name: str, config_cls: type[BaseModel]):
    """Decorator registering ``build(config) -> BlockStep`` for method ``name``."""
    def decorate(build: Callable) -> Callable:
        if name in _METHODS and _METHODS[name][1] is not build:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = (config_cls, build)
        return build
    return decorate


def known_methods() -> list[str]:
    return sorted(_METHODS)


def method_config(name: str) -> type[BaseModel]:
    return _METHODS[name][0]


# -- shared config pieces ---------------------------------------------------------------------
def check_target_spec(value: Any) -> Any:
    """``'all-linear'``, a non-empty regex string, or a non-empty list of non-empty names."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must be 'all-linear', a regex or a list of names; "
                             "got an empty string")
        if value != "all-linear":
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"{value!r} is neither 'all-linear' nor a valid regex ({err})")
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("must be 'all-linear', a regex or a list of names; got an empty list")
        bad = [v for v in value if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ValueError(f"every name in the list must be a non-empty string; got {bad[0]!r}")
        return list(value)
    raise ValueError(f"must be 'all-linear', a regex or a list of names; got {value!r}")


class LowRankConfig(BaseModel):
    """Fields shared by the low-rank compression methods (each method's config adds its own)."""

    model_config = ConfigDict(extra="forbid")

    method: str
    targets: str | list[str] = Field(
        "all-linear", description="which linears: 'all-linear' (every linear but the LM head), a "
        "list of names (a module matches if its full name equals one or ends with '.' + one), or "
        "a regex that must match the full module name")
    ratio: float = Field(
        ..., strict=True, description="fraction of the targeted parameters KEPT, in (0, 1): a "
        "rank-k factorisation of an out x in matrix keeps k*(out+in) parameters; uniform "
        "allocation uses k = rank_for_ratio(out, in, ratio)")
    allocation: Literal["uniform", "welore", "sensitivity"] = Field(
        "uniform", description="uniform: same ratio per matrix; welore: one global threshold on "
        "normalised singular values; sensitivity: per-matrix ratios minimising the summed "
        "calibration loss (needs the input Gram; two passes)")
    candidates: list[float] | None = Field(
        None, description="sensitivity only: candidate per-matrix ratios in (0, 1] (1 = stays "
        "dense); default 0.2, 0.3, ..., 0.9, 1.0, plus `ratio` itself")
    svd: Literal["exact", "randomized"] = Field(
        "exact", description="exact SVD (default) or the randomized range finder (Halko et al. "
        "2011) for the final rank-k factorisation; allocation always measures with exact SVD")

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v):
        return check_target_spec(v)

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v):
        if not 0 < v < 1:
            raise ValueError(f"must be in (0, 1), got {v} "
                             "(the fraction of the targeted parameters kept)")
        return v

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must be a non-empty list of ratios in (0, 1]")
            bad = [c for c in v if not 0 < c <= 1]
            if bad:
                raise ValueError(f"every candidate must be in (0, 1], got {bad[0]}")
        return v

    @model_validator(mode="after")
    def _candidates_need_sensitivity(self):
        if self.candidates is not None and self.allocation != "sensitivity":
            raise ValueError(f"candidates: only used with allocation: sensitivity (got "
                             f"allocation: {self.allocation})")
        return self


# -- loading ----------------------------------------------------------------------------------
def _read(source) -> Any:
    if isinstance(source, (list, dict)):
        return source
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and (
            os.path.exists(source) or source.endswith((".yaml", ".yml")))):
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
    elif isinstance(source, str):
        text = source
    else:
        raise RecipeError(f"a recipe is a path, YAML text or a list of steps; got "
                          f"{type(source).__name__}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe is not valid YAML: {err}") from None


def _steps(data: Any) -> list:
    if isinstance(data, dict):
        extra = sorted(set(data) - {"steps"})
        if extra:
            raise RecipeError(f"a recipe mapping has only the key 'steps'; unknown: {extra}")
        data = data.get("steps")
    if not isinstance(data, list):
        raise RecipeError("a recipe is a list of steps (or a mapping with key 'steps' holding "
                          f"one); got {type(data).__name__}")
    if not data:
        raise RecipeError("the recipe has no steps")
    return data


def _describe(err: dict, config_cls: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        known = ", ".join(f for f in config_cls.model_fields if f != "method")
        return f"{loc}: unknown parameter; known: {known}"
    if kind == "missing":
        return f"{loc}: required parameter is missing"
    if kind == "value_error":
        msg = str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
        if msg.startswith("candidates:"):
            return msg
        return f"{loc}: {msg}" if loc else msg
    if kind == "literal_error":
        return f"{loc}: must be {err['ctx']['expected']}, got {value!r}"
    if kind.startswith(("float", "int")):
        return f"{loc}: must be a number, got {value!r}"
    return f"{loc}: {err['msg'].lower()}, got {value!r}"


def load_recipe(source) -> list[BaseModel]:
    """Validated step configs from a path, YAML text, or a parsed list / ``{'steps': [...]}``.

    Raises :class:`RecipeError` listing every problem, one line each, before anything runs.
    """
    steps = _steps(_read(source))
    configs, problems = [], []
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            problems.append(f"step {i}: must be a mapping with a 'method' key, got {step!r}")
            continue
        method = step.get("method")
        if method is None:
            problems.append(f"step {i}: method: missing; known methods: "
                            f"{', '.join(known_methods())}")
            continue
        if method not in _METHODS:
            problems.append(f"step {i}: method: unknown method {method!r}; known methods: "
                            f"{', '.join(known_methods())}")
            continue
        config_cls = _METHODS[method][0]
        try:
            configs.append(config_cls.model_validate(step))
        except ValidationError as err:
            for e in err.errors():
                problems.append(f"step {i} ({method}): {_describe(e, config_cls)}")
    if problems:
        raise RecipeError("\n".join(problems))
    return configs


def check_targets(model, configs) -> None:
    """After loading the model: :class:`RecipeError` for a step whose targets match nothing."""
    problems = []
    for i, config in enumerate(configs):
        if not match_targets(model, config.targets):
            problems.append(f"step {i} ({config.method}): targets: {config.targets!r} match no "
                            f"linear layer in {type(model).__name__}")
    if problems:
        raise RecipeError("\n".join(problems))


def build_steps(configs) -> list:
    """One pipeline step (``BlockStep``) per config, built by its registered method."""
    return [_METHODS[c.method][1](c) for c in configs]


# the built-in methods register themselves on import (kept last: they import this module)
from slimtune.compress import asvd, fwsvd, svd, svd_llm  # noqa: E402,F401
