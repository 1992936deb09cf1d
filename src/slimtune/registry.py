"""One registry for every family of methods (compression steps, adapters, later merges and
optimisers), and the one format of every config validation error.

A family owns one :class:`Registry`; a method module registers itself at the bottom of its own
file::

    METHODS = Registry("adapter method", required=("init_layer",),
                       optional=("prepare", "loss", "after_step"))     # in adapt/registry.py
    METHODS.register("pissa", PiSSAConfig, init_layer=init_layer)     # in adapt/pissa.py

and the family's ``__init__.py`` imports its method modules once. ``get(name)`` returns the
:class:`Entry` (config class and hooks); ``make_config(name, where, **params)`` validates
parameters. Every validation problem, here and wherever a pydantic config is checked, reads::

    <where> (<method>): <key>: <problem>        e.g.  step 2 (svd_llm): ratio: must be in (0, 1), got 1.5

(`` (<method>)`` is left out for configs that belong to no method, ``<key>: `` for a problem of
the whole config). Several problems are one line each in one :class:`ConfigError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """Parameters that do not validate; one ``<where> (<method>): <key>: <problem>`` per line."""


def describe_problem(err: dict, config_cls: type[BaseModel]) -> tuple[str, str]:
    """``(key, problem)`` of one pydantic error dict, worded for a person."""
    key = ".".join(str(p) for p in err["loc"])
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        known = ", ".join(info.alias or f for f, info in config_cls.model_fields.items()
                          if f != "method")
        return key, f"unknown parameter; known: {known}"
    if kind == "missing":
        return key, "required parameter is missing"
    if kind == "value_error":
        return key, str(err["ctx"]["error"]) if "ctx" in err else err["msg"]
    if kind == "literal_error":
        return key, f"must be {err['ctx']['expected']}, got {value!r}"
    if kind.startswith(("float", "int")) and kind.endswith(("_type", "_parsing")):
        return key, f"must be a number, got {value!r}"
    return key, f"{err['msg'][:1].lower()}{err['msg'][1:]}, got {value!r}"


def format_problem(where: str, method: str | None, key: str, problem: str) -> str:
    head = where if method is None else f"{where} ({method})"
    return f"{head}: {key}: {problem}" if key else f"{head}: {problem}"


def config_problems(err: ValidationError, config_cls: type[BaseModel], where: str,
                    method: str | None = None, key: Callable[[str], str] = str) -> list[str]:
    """One line per error of ``err``; ``key`` renders a field name (the CLI shows ``--flag``)."""
    lines = []
    for e in err.errors():
        name, problem = describe_problem(e, config_cls)
        lines.append(format_problem(where, method, key(name) if name else "", problem))
    return lines


def validate(config_cls: type[BaseModel], params: dict, where: str, method: str | None = None,
             key: Callable[[str], str] = str) -> BaseModel:
    """``config_cls.model_validate(params)`` or a :class:`ConfigError` listing every problem."""
    try:
        return config_cls.model_validate(params)
    except ValidationError as err:
        raise ConfigError("\n".join(config_problems(err, config_cls, where, method, key))) \
            from None


@dataclass(frozen=True)
class Entry:
    """A registered method: its name, pydantic config class and hooks (plain functions)."""

    name: str
    config: type[BaseModel]
    hooks: dict[str, Callable] = field(default_factory=dict)

    def hook(self, name: str) -> Callable | None:
        return self.hooks.get(name)


class Registry:
    """Methods of one family by name. ``required`` hooks must be given at registration;
    ``optional`` ones may be; any other hook name is refused."""

    def __init__(self, family: str, required: tuple[str, ...] = (),
                 optional: tuple[str, ...] = ()):
        self.family, self.required, self.optional = family, tuple(required), tuple(optional)
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, config: type[BaseModel], **hooks: Callable) -> Entry:
        missing = [h for h in self.required if hooks.get(h) is None]
        unknown = sorted(set(hooks) - set(self.required) - set(self.optional))
        if missing or unknown:
            raise ValueError(f"{self.family} {name!r}: missing hooks {missing}, unknown hooks "
                             f"{unknown} (hooks: {', '.join(self.required + self.optional)})")
        hooks = {h: f for h, f in hooks.items() if f is not None}
        old = self._entries.get(name)
        if old is not None and (old.config is not config or old.hooks != hooks):
            raise ValueError(f"{self.family} {name!r} is already registered")
        self._entries[name] = Entry(name, config, hooks)
        return self._entries[name]

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests and plugins that register a method for a while)."""
        self.get(name)
        del self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def unknown(self, name: Any) -> str:
        """The message for a name that is not registered."""
        return f"unknown {self.family} {name!r}; known: {', '.join(self.names())}"

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def make_config(self, name: str, where: str, **params: Any) -> BaseModel:
        """The validated config of method ``name``; :class:`ConfigError` names every problem."""
        entry = self.get(name)
        return validate(entry.config, {"method": name, **params}, where, name)
