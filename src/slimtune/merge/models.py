"""Model-level merging, streamed tensor by tensor: ``merge_models(config, out)``.

The config (a YAML file for ``slimtune merge``, or a dict) names the ``method``, the ``base`` (a
registered model name or a Hugging Face directory), the ``models`` (``path`` and ``weight``) and
the method's own keys at the top level. Everything is validated before any tensor is read: the
method and its keys, every path, the architectures, and every tensor's name and shape (from the
safetensors headers), so a vocabulary or shape mismatch is one error naming the entry and tensor.

Then each tensor of the base is read once from every input (``safe_open``), merged in float32
(τᵢ = Wᵢ − W_base, :data:`~slimtune.merge.registry.MERGES`), cast back to the base's dtype and
written into shards planned from the base's sizes, inside an atomic output directory: three
inputs cost about one output shard plus one tensor per input of memory, and an interrupted merge
leaves nothing behind. Non-float tensors are copied from the base (an input may lack them, as
re-saved BERT models lack ``position_ids``). Methods that draw random
numbers use one generator seeded once for the whole run, so results are deterministic per seed.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file

from slimtune.io.atomic import atomic_dir
from slimtune.merge.config import check_model_count
from slimtune.merge.registry import MERGES
from slimtune.models import resolve_model_dir
from slimtune.progress import progress_bar
from slimtune.registry import validate

SHARD_BYTES = 2 * 2 ** 30
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors")


class MergeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    weight: float = 1.0


class MergeFile(BaseModel):
    """The config's own keys; every other top-level key belongs to the method."""

    model_config = ConfigDict(extra="allow")

    method: str
    base: str
    models: list[MergeInput] = Field(..., min_length=1)


def load_config(config: dict | str | os.PathLike) -> tuple[MergeFile, BaseModel]:
    """``(file config, method config)`` from a dict or a YAML file; one error per bad key."""
    if not isinstance(config, dict):
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"merge config {path} does not exist")
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"merge config {path}: not valid YAML ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"merge config {path}: expected a mapping of keys")
    method = config.get("method")
    if method not in MERGES:
        raise ValueError(f"merge config: method: {MERGES.unknown(method)}")
    own = {k: config[k] for k in ("method", "base", "models") if k in config}
    spec = validate(MergeFile, own, "merge config")
    params = {k: v for k, v in config.items() if k not in own}
    method_config = MERGES.make_config(method, "merge config", **params)
    check_model_count(method_config, len(spec.models), "merge config: models")
    return spec, method_config


def tensor_files(directory: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a Hugging Face model directory."""
    index, single = (directory / f for f in WEIGHT_FILES)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}
    raise ValueError(f"{directory} has no {' or '.join(WEIGHT_FILES)}")


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} from the safetensors headers (no tensor is read)."""
    shapes = {}
    for file in sorted(set(files.values())):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                shapes[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return shapes


def check_inputs(spec: MergeFile) -> tuple[Path, list[Path], dict]:
    """``(base dir, model dirs, base shapes)`` after every check that needs no tensor data."""
    base = resolve_model_dir(spec.base)
    if not (base / "config.json").is_file():
        raise ValueError(f"merge config: base: {spec.base} is not a Hugging Face model directory "
                         "(no config.json)")
    base_config = json.loads((base / "config.json").read_text())
    shapes = tensor_shapes(tensor_files(base))
    dirs = []
    for i, entry in enumerate(spec.models):
        where = f"merge config: models[{i}] ({entry.path})"
        path = Path(entry.path).expanduser()
        if not path.is_dir():
            raise ValueError(f"{where}: path: no such directory")
        if not (path / "config.json").is_file():
            raise ValueError(f"{where}: path: not a Hugging Face model directory (no "
                             "config.json); adapter directories are not supported yet")
        config = json.loads((path / "config.json").read_text())
        for key in ("model_type", "architectures", "vocab_size", "hidden_size",
                    "num_hidden_layers"):
            if config.get(key) != base_config.get(key):
                raise ValueError(f"{where}: {key} {config.get(key)!r} differs from the base's "
                                 f"{base_config.get(key)!r}")
        theirs = tensor_shapes(tensor_files(path))
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
        dirs.append(path)
    return base, dirs, shapes


def plan_shards(names: list[str], nbytes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive groups of tensors of at most ``limit`` bytes each (a larger tensor alone)."""
    shards, size = [[]], 0
    for name in names:
        if shards[-1] and size + nbytes[name] > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    return shards


def merge_models(config: dict | str | os.PathLike, out: str | os.PathLike,
                 overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
                 progress: bool = True) -> Path:
    """Merge the config's models into a Hugging Face directory ``out`` (see the module doc)."""
    spec, method_config = load_config(config)
    base, dirs, shapes = check_inputs(spec)
    merge = MERGES.get(spec.method).hook("merge")
    base_files, model_files = tensor_files(base), [tensor_files(d) for d in dirs]
    names = list(shapes)
    unknown = sorted(n for n, (_, dtype) in shapes.items() if dtype not in SAFETENSORS_DTYPES)
    if unknown:
        raise ValueError(f"merge: base tensor {unknown[0]} has dtype {shapes[unknown[0]][1]}, "
                         f"which is not merged (known: {', '.join(SAFETENSORS_DTYPES)})")
    nbytes = {n: SAFETENSORS_DTYPES[dtype].itemsize * math.prod(shape)
              for n, (shape, dtype) in shapes.items()}
    shards = plan_shards(names, nbytes, shard_bytes)
    weights = torch.tensor([m.weight for m in spec.models])
    generator = torch.Generator().manual_seed(getattr(method_config, "seed", 0))
    bar, task = progress_bar(len(names), f"merge ({spec.method})", progress)
    with bar, atomic_dir(out, overwrite=overwrite) as tmp, contextlib.ExitStack() as stack:
        opened = {f: stack.enter_context(safe_open(str(f), "pt"))
                  for files in (base_files, *model_files) for f in set(files.values())}
        weight_map = {}
        for s, shard in enumerate(shards):
            file = ("model.safetensors" if len(shards) == 1
                    else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors")
            tensors = {}
            for name in shard:
                tensors[name] = merged_tensor(name, opened[base_files[name]],
                                              [opened[files[name]] for files in model_files
                                               if name in files],
                                              weights, merge, method_config, generator)
                weight_map[name] = file
                bar.advance(task)
            save_file(tensors, str(tmp / file), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for item in base.iterdir():  # config, generation config, tokenizer files
            if item.is_file() and not item.name.startswith(".") and \
                    not item.name.endswith(".safetensors") and item.name not in WEIGHT_FILES:
                shutil.copy2(item, tmp / item.name)
        manifest = {"merge": {"method": spec.method, "base": spec.base,
                              "models": [m.model_dump() for m in spec.models],
                              "params": method_config.model_dump(by_alias=True,
                                                                 exclude={"method"})}}
        (tmp / "slimtune_merge.json").write_text(json.dumps(manifest, indent=2))
    return Path(out)


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def merged_tensor(name, base_handle, handles, weights, merge, config, generator):
    """One output tensor: the base's, plus the method's merge of the inputs' task vectors."""
    base = base_handle.get_tensor(name)
    if not base.is_floating_point():
        return base.contiguous()
    stacked = torch.stack([h.get_tensor(name).float() - base.float() for h in handles])
    w = weights.reshape(-1, *[1] * base.dim())
    merged = merge(stacked, w, config, generator, base=base.float())
    return (base.float() + merged).to(base.dtype).contiguous()
