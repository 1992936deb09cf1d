"""Selecting the linear layers of a model and swapping them for factored ones.

``check_target_spec`` validates a target spec (``"all-linear"``, a list of names, or a regex)
without a model (config validators call it); ``match_targets`` turns one into module names;
``set_module`` puts a module at a name (the only place that does); ``replace_linears`` puts a new
module at each selected name; ``factored_layers`` lists the ``FactoredLinear`` layers a model
holds and ``merge_factored`` turns them back into plain ``nn.Linear`` layers.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable

from torch import nn

from slimtune.layers import FactoredLinear

Targets = str | Iterable[str]


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


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model`` (replacing what is there)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the LM head (output embedding), skipped by target patterns unless named."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
    return names


def match_targets(model: nn.Module, targets: Targets, include_factored: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` modules selected by ``targets``, in model order.

    ``FactoredLinear`` layers are selected too when ``include_factored`` (for analysis), never
    for wrapping.

    - ``"all-linear"``: every linear except the LM head.
    - a list of names: a module matches a name if its full name equals it or ends with
      ``"." + name`` (``"q_proj"`` selects every attention query projection). The LM head is
      selected only when named in full (``"lm_head"``).
    - any other string: a regular expression that must match the full module name.
    Embeddings are never selected (they are not ``nn.Linear``).
    """
    head = output_layer_names(model)
    kinds = (nn.Linear, FactoredLinear) if include_factored else (nn.Linear,)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    if isinstance(targets, str):
        if targets == "all-linear":
            return [n for n, _ in linears if n not in head]
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets {targets!r} is not 'all-linear' or a valid regex: {err}")
        return [n for n, _ in linears if pattern.fullmatch(n)]
    wanted = list(targets)
    if not wanted or not all(isinstance(t, str) and t for t in wanted):
        raise ValueError(f"targets must be 'all-linear', a regex or a list of names; got {targets!r}")
    return [n for n, _ in linears
            if n in wanted or (n not in head and any(n.endswith("." + t) for t in wanted))]


def replace_linears(model: nn.Module, targets: Targets = "all-linear",
                    factory: Callable[[str, nn.Linear], nn.Module] | None = None) -> dict:
    """Replace the selected linears in place with ``factory(name, linear)``.

    The default factory wraps each one as a ``FactoredLinear`` with only its dense base. Returns
    ``{name: new_module}``. Raises ``ValueError`` when ``targets`` selects nothing.
    """
    names = match_targets(model, targets)
    if not names:
        raise ValueError(f"targets {targets!r} match no linear layer in {type(model).__name__}")
    factory = factory or (lambda name, linear: FactoredLinear.from_linear(linear))
    replaced = {}
    for name in names:
        new = factory(name, model.get_submodule(name))
        set_module(model, name, new)
        replaced[name] = new
    return replaced


def factored_layers(model: nn.Module) -> dict[str, FactoredLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FactoredLinear)}


def merge_factored(model: nn.Module) -> int:
    """Replace every ``FactoredLinear`` in ``model`` by its dense ``nn.Linear``; returns the count."""
    layers = factored_layers(model)
    for name, layer in layers.items():
        set_module(model, name, layer.to_dense())
    return len(layers)
