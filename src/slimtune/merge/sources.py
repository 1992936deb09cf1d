"""The inputs of a model-level merge: Hugging Face model directories and adapter directories.

Each input is checked against the base from headers and JSON alone (:func:`open_sources` raises
one error naming the entry and the key before any tensor is read), then read tensor by tensor:
a model directory through :class:`~slimtune.io.safetensors_stream.SafetensorsReader` (one tensor,
or a range of its rows, at a time; no memory map), an adapter (slimtune
or PEFT LoRA, :mod:`slimtune.io.adapter_files`; small) as ``W_base + B·A`` for the weights it
updates, its fully trained tensors as they are, and the base's value everywhere else (τ = 0).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from slimtune.io.adapter_files import adapter_format, adapter_layout, read_adapter
from slimtune.io.safetensors_stream import SafetensorsReader
from slimtune.models import MODEL_NAMES, resolve_model_dir

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
ARCHITECTURE_KEYS = ("model_type", "architectures", "vocab_size", "hidden_size",
                     "num_hidden_layers")


def tensor_files(directory: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a Hugging Face model directory."""
    index, single = (directory / f for f in WEIGHT_FILES)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    if single.is_file():
        with SafetensorsReader(single) as f:
            return {name: single for name in f.keys()}
    raise ValueError(f"{directory} has no {' or '.join(WEIGHT_FILES)}")


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} from the safetensors headers (no tensor is read)."""
    shapes = {}
    for file in sorted(set(files.values())):
        with SafetensorsReader(file) as f:
            for name, entry in f.header.items():
                shapes[name] = (tuple(entry["shape"]), entry["dtype"])
    return shapes


class ModelSource:
    """A fully fine-tuned model: every tensor read from its own files."""

    is_adapter = False

    def __init__(self, path: Path, where: str, base_config: dict, shapes: dict):
        config = json.loads((path / "config.json").read_text())
        for key in ARCHITECTURE_KEYS:
            if config.get(key) != base_config.get(key):
                raise ValueError(f"{where}: {key} {config.get(key)!r} differs from the base's "
                                 f"{base_config.get(key)!r}")
        self.path, self.files = path, tensor_files(path)
        theirs = tensor_shapes(self.files)
        for name, (shape, dtype) in shapes.items():
            if name not in theirs and dtype not in FLOAT_DTYPES:
                continue  # a buffer such as BERT's position_ids: copied from the base
            if name not in theirs:
                raise ValueError(f"{where}: tensor {name} is missing")
            if theirs[name][0] != shape:
                raise ValueError(f"{where}: tensor {name} has shape {list(theirs[name][0])}, "
                                 f"the base's is {list(shape)}")
        extra = sorted(set(theirs) - set(shapes))
        if extra:
            raise ValueError(f"{where}: tensors not in the base: {', '.join(extra[:5])}")

    def open(self, stack: contextlib.ExitStack) -> None:
        self.handles = {f: stack.enter_context(SafetensorsReader(f))
                        for f in set(self.files.values())}

    def tensor(self, name: str, base: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        return self.handles[self.files[name]].get(name, rows).float()


def same_base(recorded: str | None, base: Path) -> bool:
    """Whether an adapter's recorded base model is ``base`` (a registered name, its converted
    directory, or the same directory)."""
    if not recorded:
        return True  # nothing recorded: the shapes are the only check
    path = Path(recorded).expanduser()
    if path.is_dir():
        return path.resolve() == base.resolve()
    if recorded in MODEL_NAMES:
        return resolve_model_dir(recorded).resolve() == base.resolve()
    return path.name == base.name


class AdapterSource:
    """A LoRA adapter: ``W_base + B·A`` on the weights it updates, the base elsewhere."""

    is_adapter = True

    def __init__(self, path: Path, where: str, base: Path, shapes: dict):
        self.path, self.layout = path, adapter_layout(path)
        if not same_base(self.layout.base_model, base):
            raise ValueError(f"{where}: an adapter for base model {self.layout.base_model}, "
                             f"not the base named ({base})")
        for name, (out_features, in_features) in self.layout.layers.items():
            weight = f"{name}.weight"
            if weight not in shapes:
                raise ValueError(f"{where}: the base has no weight {weight}")
            if shapes[weight][0] != (out_features, in_features):
                raise ValueError(f"{where}: layer {name} is {out_features}x{in_features}, the "
                                 f"base's weight is {list(shapes[weight][0])}")
        for name, shape in self.layout.full.items():
            if name not in shapes or shapes[name][0] != tuple(shape):
                raise ValueError(f"{where}: trained tensor {name} {list(shape)} does not match "
                                 "the base")

    def open(self, stack: contextlib.ExitStack) -> None:
        updates = read_adapter(self.path)
        self.layers = {f"{n}.weight": f for n, f in updates.layers.items()}
        self.full = updates.full

    def factors(self, weight: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.layers.get(weight)

    def tensor(self, name: str, base: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """``base``: the base's tensor, or its ``rows``."""
        if name in self.full:
            return self.full[name] if rows is None else self.full[name][rows]
        if name in self.layers:
            B, A = self.layers[name]
            return base.float() + (B if rows is None else B[rows]) @ A
        return base.float()


def open_sources(base_name: str, paths: list[str]) -> tuple[Path, dict, list]:
    """``(base dir, base shapes, sources)`` after every check that needs no tensor data."""
    base = resolve_model_dir(base_name)
    if not (base / "config.json").is_file():
        raise ValueError(f"merge config: base: {base_name} is not a Hugging Face model "
                         "directory (no config.json)")
    base_config = json.loads((base / "config.json").read_text())
    shapes = tensor_shapes(tensor_files(base))
    sources = []
    for i, entry in enumerate(paths):
        where = f"merge config: models[{i}] ({entry})"
        path = Path(entry).expanduser()
        if not path.is_dir():
            raise ValueError(f"{where}: path: no such directory")
        if adapter_format(path) is not None:
            try:
                sources.append(AdapterSource(path, where, base, shapes))
            except ValueError as err:
                message = str(err)
                raise ValueError(message if message.startswith(where)
                                 else f"{where}: {message}") from None
        elif (path / "config.json").is_file():
            sources.append(ModelSource(path, where, base_config, shapes))
        else:
            raise ValueError(f"{where}: path: neither a Hugging Face model directory (no "
                             "config.json) nor an adapter directory (no adapter.json or "
                             "adapter_config.json)")
    return base, shapes, sources
