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
- A compensating step (its config class sets ``compensates = True``, e.g. ``eora``) repairs what
  earlier steps changed: with no compressing step before it the recipe is refused, and
  :func:`check_targets` refuses one that targets a layer no earlier compressing step targets.
- :func:`check_targets` (after the model is loaded, or on its weightless skeleton
  :func:`slimtune.models.model_skeleton`): every step's targets match some linear, and every
  targeted layer passes the step's ``check_layer`` (e.g. the group size divides its width).
- :func:`build_steps` turns configs into pipeline steps.
Methods live in :data:`slimtune.compress.registry.METHODS` (``METHODS.register("name",
NameConfig, build=build)`` at the bottom of each method's file, ``build(config) -> step``); the
``slimtune.compress`` package imports them, so importing this module has them all registered.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from slimtune.compress.registry import METHODS
from slimtune.registry import ConfigError
from slimtune.targets import match_targets


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the step, method and key."""


def known_methods() -> list[str]:
    return METHODS.names()


def method_config(name: str) -> type[BaseModel]:
    return METHODS.get(name).config


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
        if method not in METHODS:
            problems.append(f"step {i}: method: unknown method {method!r}; known methods: "
                            f"{', '.join(known_methods())}")
            continue
        params = {k: v for k, v in step.items() if k != "method"}
        try:
            configs.append(METHODS.make_config(method, f"step {i}", **params))
        except ConfigError as err:
            problems.extend(str(err).splitlines())
    if not problems:
        problems = _order_problems(configs)
    if problems:
        raise RecipeError("\n".join(problems))
    return configs


def compensates(config) -> bool:
    return bool(getattr(type(config), "compensates", False))


def _order_problems(configs, matched: list[set[str]] | None = None) -> list[str]:
    """Compensating steps need a compressing step before them (on every layer they target)."""
    problems = []
    for i, config in enumerate(configs):
        if not compensates(config):
            continue
        earlier = [k for k in range(i) if not compensates(configs[k])]
        where = f"step {i} ({config.method})"
        if not earlier:
            problems.append(f"{where}: compensates what earlier steps lost, but no step before "
                            "it compresses anything (put e.g. a gptq or sparsegpt step first)")
        elif matched is not None:
            covered = set().union(*(matched[k] for k in earlier))
            alone = sorted(matched[i] - covered)
            if alone:
                problems.append(f"{where}: targets: {len(alone)} layers that no earlier step "
                                f"compresses, e.g. {', '.join(alone[:3])}")
    return problems


def check_targets(model, configs) -> None:
    """After loading the model, before any work: :class:`RecipeError` for a step whose targets
    match nothing or include layers it cannot handle (its ``check_layer`` hook)."""
    problems, matched = [], []
    for i, config in enumerate(configs):
        names = match_targets(model, config.targets)
        matched.append(set(names))
        if not names:
            problems.append(f"step {i} ({config.method}): targets: {config.targets!r} match no "
                            f"linear layer in {type(model).__name__}")
        check = METHODS.get(config.method).hook("check_layer")
        refused: dict[str, list[str]] = {}
        for name in names if check is not None else ():
            try:
                check(config, name, model.get_submodule(name))
            except ValueError as err:
                refused.setdefault(str(err), []).append(name)
        for message, layers in refused.items():
            problems.append(f"step {i} ({config.method}): {message} ({len(layers)} targeted "
                            f"layers, e.g. {', '.join(layers[:3])})")
    problems += _order_problems(configs, matched)
    if problems:
        raise RecipeError("\n".join(problems))


def build_steps(configs) -> list:
    """One pipeline step (``BlockStep``) per config, built by its registered method."""
    return [METHODS.get(c.method).hook("build")(c) for c in configs]
