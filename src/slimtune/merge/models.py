"""Model-level merging, streamed tensor by tensor: ``merge_models(config, out)``.

The config (a YAML file for ``slimtune merge``, or a dict) names the ``method``, the ``base`` (a
registered model name or a Hugging Face directory), the ``models`` (``path`` and ``weight``) and
the method's own keys at the top level. Everything is validated before any tensor is read: the
method and its keys, every path, the architectures, and every tensor's name and shape (from the
safetensors headers), so a vocabulary or shape mismatch is one error naming the entry and tensor.

Inputs are Hugging Face model directories or adapter directories (slimtune or PEFT LoRA,
:mod:`.sources`), in any mix. Each tensor of the base is read once from every input, merged in
float32 (τᵢ = Wᵢ − W_base, :data:`~slimtune.merge.registry.MERGES`), cast back to the base's
dtype and streamed into shards planned from the base's sizes (the shard's header is written first,
:class:`~slimtune.io.safetensors_stream.SafetensorsStream`), inside an atomic output directory:
memory is about one tensor per input, never a model per input, and an interrupted merge leaves
nothing behind. A tensor larger than about 16 MB (the embedding) is merged in ranges of rows, so
it never sits in memory once per input: directly for the methods whose result at an entry
depends only on that entry (hook ``elementwise``), after counting passes for those that need
statistics of the whole tensor (hook ``stream``: norms, exact k-th magnitudes and top-k masks,
order statistics, a random stream, Gram matrices), and after a trim over the whole flattened
task vector from exact k-th magnitudes (hook ``trim``: ``ties`` with ``scope: model``)
(:mod:`.dense`).

When every input is an adapter and the method merges factors (hook ``merge_factors``: ``linear``,
``task_arithmetic``, ``flora``, ``knots``, ``lora_lego``), the output is an adapter directory
(:mod:`.factored`) unless the config says ``output: model``. Non-float tensors are copied from
the base (an input may lack them, as re-saved BERT models lack ``position_ids``). Methods that
draw random numbers use one generator seeded once for the whole run: deterministic per seed.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from slimtune.io.atomic import atomic_dir
from slimtune.io.safetensors_stream import DTYPES, SafetensorsReader
from slimtune.merge.config import check_model_count
from slimtune.merge.dense import merge_dense, plan_shards  # noqa: F401 (plan_shards: API)
from slimtune.merge.factored import merge_adapters
from slimtune.merge.registry import MERGES
from slimtune.merge.sources import WEIGHT_FILES, open_sources, tensor_files
from slimtune.registry import validate

SHARD_BYTES = 2 * 2 ** 30


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
    output: Literal["auto", "model", "adapter"] = "auto"


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
    own = {k: config[k] for k in ("method", "base", "models", "output") if k in config}
    spec = validate(MergeFile, own, "merge config")
    params = {k: v for k, v in config.items() if k not in own}
    method_config = MERGES.make_config(method, "merge config", **params)
    check_model_count(method_config, len(spec.models), "merge config: models")
    return spec, method_config


def check_inputs(spec: MergeFile) -> tuple[Path, list, dict]:
    """``(base dir, sources, base shapes)`` after every check that needs no tensor data, and the
    output kind (:func:`output_kind`) checked against them."""
    base, shapes, sources = open_sources(spec.base, [m.path for m in spec.models])
    output_kind(spec, sources)
    return base, sources, shapes


def output_kind(spec: MergeFile, sources: list) -> str:
    """``"adapter"`` when every input is an adapter and the method merges factors (unless
    ``output: model``), else ``"model"``; ``output: adapter`` that cannot hold is an error."""
    factored = MERGES.get(spec.method).hook("merge_factors") is not None
    adapters = all(s.is_adapter for s in sources)
    full = [str(s.path) for s in sources if s.is_adapter and s.layout.full]
    if spec.output == "adapter" and not (factored and adapters and not full):
        why = ("not every input is an adapter" if not adapters else
               f"adapters {full} also train full tensors" if full else
               f"{spec.method} does not merge in factored form (methods that do: "
               f"{', '.join(n for n in MERGES.names() if MERGES.get(n).hook('merge_factors'))})")
        raise ValueError(f"merge config: output: adapter: {why}")
    return "adapter" if spec.output != "model" and factored and adapters and not full else "model"


def merge_models(config: dict | str | os.PathLike, out: str | os.PathLike,
                 overwrite: bool = False, shard_bytes: int = SHARD_BYTES,
                 progress: bool = True) -> Path:
    """Merge the config's models into ``out``: a Hugging Face model directory, or an adapter
    directory when every input is an adapter and the method merges factors (module doc)."""
    spec, method_config = load_config(config)
    base, sources, shapes = check_inputs(spec)
    unknown = sorted(n for n, (_, dtype) in shapes.items() if dtype not in DTYPES)
    if unknown:
        raise ValueError(f"merge: base tensor {unknown[0]} has dtype {shapes[unknown[0]][1]}, "
                         f"which is not merged (known: {', '.join(DTYPES)})")
    manifest = {"merge": {"method": spec.method, "base": spec.base,
                          "models": [m.model_dump() for m in spec.models],
                          "params": method_config.model_dump(by_alias=True,
                                                             exclude={"method"})}}
    weights = [m.weight for m in spec.models]
    with atomic_dir(out, overwrite=overwrite) as tmp, contextlib.ExitStack() as stack:
        base_files = tensor_files(base)
        base_handles = {f: stack.enter_context(SafetensorsReader(f))
                        for f in set(base_files.values())}
        for source in sources:
            source.open(stack)
        reader = BaseReader(base_files, base_handles)
        if output_kind(spec, sources) == "adapter":
            merge_adapters(tmp, spec, method_config, sources, base, shapes, weights, progress)
        else:
            merge_dense(tmp, spec, method_config, sources, reader, shapes, weights, shard_bytes,
                        progress)
            for item in base.iterdir():  # config, generation config, tokenizer files
                if item.is_file() and not item.name.startswith(".") and \
                        not item.name.endswith(".safetensors") and item.name not in WEIGHT_FILES:
                    shutil.copy2(item, tmp / item.name)
        (tmp / "slimtune_merge.json").write_text(json.dumps(manifest, indent=2))
    return Path(out)


class BaseReader:
    """The base's tensors by name (whole, or a range of rows)."""

    def __init__(self, files: dict[str, Path], handles: dict):
        self.files, self.handles = files, handles

    def __call__(self, name: str, rows: slice | None = None) -> torch.Tensor:
        return self.handles[self.files[name]].get(name, rows)

    def numel(self, name: str) -> int:
        return math.prod(self.handles[self.files[name]].shape(name))
