"""The dense half of a model-level merge: every base tensor merged and streamed into shards.

Each tensor is read from the base and every input, merged in float32 and written through a
:class:`~slimtune.io.safetensors_stream.SafetensorsStream` whose header was written first, so the
process holds one tensor per input at most. Less for the methods whose result at an entry depends
only on the (trimmed) task vectors at that entry (hook ``elementwise``): they get ranges of rows
of about :data:`CHUNK_BYTES`.

A method whose result at an entry needs statistics of the whole tensor (norms, k-th magnitudes,
order statistics, a random stream) registers hook ``stream``: a tensor larger than one chunk is
then read range of rows by range of rows, once for each of the stream's counting passes and once
to merge (:mod:`slimtune.merge.registry` has the protocol), so no input tensor is ever whole in
memory. A method with a trim over each model's whole flattened task vector (hook ``trim``,
``ties`` with ``scope: model``) has it done here, from exact k-th magnitudes found in two
streaming passes over every tensor
(:class:`~slimtune.weights.magnitude_threshold.KthMagnitude`); ``merge`` then gets
``trimmed=True``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from slimtune.io.safetensors_stream import SafetensorsStream, nbytes
from slimtune.merge.registry import MERGES
from slimtune.merge.sources import FLOAT_DTYPES
from slimtune.progress import progress_bar
from slimtune.weights.magnitude_threshold import KthMagnitude

CHUNK_BYTES = 16 * 2 ** 20


def rows_per_chunk(shape: tuple[int, ...]) -> int:
    """Rows of a float32 tensor of ``shape`` per chunk of about :data:`CHUNK_BYTES`."""
    row = 4 * math.prod(shape[1:]) if len(shape) > 1 else 4
    return max(1, CHUNK_BYTES // max(row, 1))


def row_chunks(shape: tuple[int, ...]) -> list[slice]:
    step = rows_per_chunk(shape)
    return [slice(r, r + step) for r in range(0, shape[0], step)]


def chunks_of(shape: tuple[int, ...]) -> list[slice] | None:
    """The ranges of rows a tensor of ``shape`` is read in; None: it fits one chunk."""
    return row_chunks(shape) if len(shape) > 0 and rows_per_chunk(shape) < shape[0] else None


def find_thresholds(sources, read_base, names, density, parts=None) -> list[KthMagnitude]:
    """One finder per model, after both passes over ``names`` (each in the ranges of rows
    ``parts(name)`` gives, or whole): the k-th largest ``|τ|`` with ``k = int(density ·
    entries)``."""
    total = sum(read_base.numel(n) for n in names)
    finders = [KthMagnitude(total, int(density * total)) for _ in sources]
    for _ in range(2):
        for name in names:
            for rows in (parts(name) if parts else None) or [None]:
                base = read_base(name, rows).float()
                for source, finder in zip(sources, finders):
                    finder.count(source.tensor(name, base, rows) - base)
        for finder in finders:
            if finder.pass_index == 0:
                finder.next_pass()
    return finders


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


def merged_tensor(name, rows, base, sources, weights, merge, config, generator, thresholds,
                  trimmed):
    """One output tensor (or a range of its rows): the base plus the merged task vectors."""
    stacked = stacked_rows(name, rows, base, sources)
    for i in range(len(sources) if thresholds is not None else 0):
        stacked[i] *= stacked[i].abs() >= thresholds[i]
    w = weights.reshape(-1, *[1] * base.dim())
    extra = {"trimmed": trimmed} if trimmed is not None else {}
    merged = merge(stacked, w, config, generator, base=base.float(), **extra)
    del stacked
    return (merged.add_(base)).to(base.dtype)


def stacked_rows(name, rows, base, sources) -> torch.Tensor:
    """``[k, *rows]`` float32: every input's task vector at ``rows`` (None: the whole tensor)."""
    stacked = torch.empty((len(sources), *base.shape), dtype=torch.float32)
    for i, source in enumerate(sources):
        stacked[i] = source.tensor(name, base, rows)
        stacked[i] -= base
    return stacked


def streamed_rows(name, parts, stream, sources, read_base):
    """The merged task vector of one tensor from a method's stream (hook ``stream``), range of
    rows by range: its counting passes over every range first; None when the stream asks for
    the whole tensor instead."""
    while stream.wants_pass():
        for rows in parts:
            base = read_base(name, rows).float()
            stream.observe(stacked_rows(name, rows, base, sources), base)
        stream.end_pass()
        if stream.whole:
            return None
    return parts


def tensor_pieces(name, shape, plan, sources, read_base, w, merge, config, generator):
    """``(rows, merged)`` for one float tensor, whole (rows None) or range of rows by range."""
    trim, elementwise, stream_hook, model_thresholds = plan
    trimmed = False if trim is not None else None
    parts = chunks_of(shape)
    thresholds = None
    if trim is not None:
        thresholds, trimmed = model_thresholds, True
    elif parts is not None and stream_hook is not None:
        stream = stream_hook(config, w.reshape(-1, *[1] * len(shape)), shape, generator)
        if stream is not None and streamed_rows(name, parts, stream, sources, read_base):
            for rows in parts:
                base = read_base(name, rows)
                merged = stream.merge_rows(stacked_rows(name, rows, base.float(), sources),
                                           base.float())
                yield rows, merged.add_(base.float()).to(base.dtype)
            return
    if parts is None or not elementwise:
        parts = [None]
    for rows in parts:
        yield rows, merged_tensor(name, rows, read_base(name, rows), sources, w, merge, config,
                                  generator, thresholds, trimmed)


def merge_dense(tmp: Path, spec, config, sources: list, read_base, shapes: dict,
                weights: list[float], shard_bytes: int, progress: bool) -> None:
    """Every base tensor merged and streamed into shards (see the module docstring)."""
    entry = MERGES.get(spec.method)
    names = list(shapes)
    floats = [n for n in names if shapes[n][1] in FLOAT_DTYPES]
    trim = entry.hook("trim")(config) if entry.hook("trim") is not None else None
    elementwise = entry.hook("elementwise") is not None and entry.hook("elementwise")(config)
    model_thresholds = None
    if trim is not None:
        bar, task = progress_bar(1, "global trim threshold", progress)
        with bar:
            finders = find_thresholds(sources, read_base, floats, trim[1],
                                       lambda n: chunks_of(shapes[n][0]))
            bar.advance(task)
        model_thresholds = [f.value() for f in finders]
    sizes = {n: nbytes(dtype, shape) for n, (shape, dtype) in shapes.items()}
    shards = plan_shards(names, sizes, shard_bytes)
    w = torch.tensor(weights)
    generator = torch.Generator().manual_seed(getattr(config, "seed", 0))
    merge = entry.hook("merge")
    bar, task = progress_bar(len(names), f"merge ({spec.method})", progress)
    weight_map = {}
    with bar:
        for s, shard in enumerate(shards):
            file = ("model.safetensors" if len(shards) == 1
                    else f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors")
            specs = {n: (shapes[n][1], shapes[n][0]) for n in shard}
            with SafetensorsStream(tmp / file, specs, {"format": "pt"}) as stream:
                for name in shard:
                    shape = shapes[name][0]
                    if name not in floats:
                        stream.write(name, read_base(name).contiguous())
                    else:
                        plan = (trim, elementwise, entry.hook("stream"), model_thresholds)
                        for rows, merged in tensor_pieces(name, shape, plan, sources, read_base,
                                                          w, merge, config, generator):
                            if rows is None:
                                stream.write(name, merged.contiguous())
                            else:
                                stream.write_rows(name, merged.contiguous())
                    weight_map[name] = file
                    bar.advance(task)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
