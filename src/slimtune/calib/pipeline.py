"""Layer-by-layer calibration pipeline: compress a model one transformer block at a time.

The sequential scheme of GPTQ (Frantar et al. 2022), SparseGPT (Frantar & Alistarh 2023) and
SVD-LLM (Wang et al. 2024): calibration statistics of a block are taken on the inputs that the
*already compressed* earlier blocks produce, so each block's compression sees (and can compensate
for) the errors made before it, and only one block's activations are ever in memory.

:func:`run_pipeline` does, for ``windows`` [n, seqlen] and a list of steps:

1. Capture the inputs of the first block: block 0 is swapped for a catcher that stores the hidden
   states (one float32 tensor [n, seqlen, hidden] on the model's device) and the call's other
   arguments (attention mask, position embeddings/ids, ...; kept once per batch size, as windows
   of equal length without padding get the same ones), then raises to stop the forward, so only
   the embedding part runs (``use_cache=False``).
2. For each block in order, with ``sequential="layer"`` (the default): the block runs once over
   all windows (:func:`slimtune.calib.staged.run_staged`); every target linear, when all batches
   have reached it, gets the statistics its steps ``need`` (:class:`InputStatistics` of its
   inputs, which the block's already compressed earlier layers produced) and its steps in
   recipe order (``step.apply(name, layer, stats)`` returns the replacement; a later step sees
   the earlier one's result and the same input statistics). The original weight is copied first
   when a step needs ``"original"``. The block's outputs are then the compressed block's.
   With ``sequential="block"``: for each step in order, forward pre-hooks accumulate the
   statistics of all the block's targets while the block runs (each batch stops once every
   target has had its input), then every target gets that step's apply (the next step's
   statistics are re-collected on the modified block), and the compressed block runs once more
   for its outputs. By default the order is ``"layer"`` unless a step asks for ``"block"``
   (:func:`choose_sequential`; SparseGPT does). A block-order statistics forward may run in
   bfloat16 (:func:`stats_precision_for`): only the statistics change, by about bfloat16's
   rounding; the outputs forward, which carries the compression error onward, never does.
3. The outputs become the next block's inputs (the two buffers are swapped, so memory does not
   grow with depth). Statistics are freed per block. Blocks after the last one in which a step
   reads calibration inputs run no forward: their steps are applied directly.

Steps needing ``"fisher"`` get the Fisher diagonal of the calibration LM loss, computed once before
the block walk by :func:`fisher_diagonals` on the original full model (causal LMs only). A step
with ``measure`` and ``allocate`` (global rank allocation) gets a measuring pass first: every block
runs unchanged on the original outputs, ``measure`` is called for all its targets, then
``allocate()``, then the compressing pass above. Targets are matched (``match_targets``, full
names) once on the original model; only linears inside the block list are handled.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from slimtune.calib.blocks import (STAT_KINDS, BlockRunner, dense_weight, fast_bfloat16,
                                  find_blocks, keep_heap, trim_heap)
from slimtune.calib.checks import (NEEDS, check_finite, hooks_for, validate_steps,
                                   warn_small_calibration)
from slimtune.calib.fisher import fisher_diagonals
from slimtune.calib.staged import run_staged
from slimtune.evaluate import model_device, peak_rss_mb
from slimtune.models import is_causal_lm
from slimtune.progress import progress_bar, warn
from slimtune.targets import Targets, match_targets, set_module
from slimtune.weights.stats import InputStatistics

@dataclass
class LayerStats:
    inputs: InputStatistics | None  # over this layer's inputs (all calibration tokens)
    fisher: torch.Tensor | None  # [out, in] mean squared gradient of the calibration LM loss
    original: torch.Tensor | None = None  # [out, in] the layer's weight before any step ran


@runtime_checkable
class BlockStep(Protocol):
    """A compression step. ``targets`` as for ``match_targets`` (full model names); ``needs`` ⊆
    :data:`NEEDS`: ``"gram"`` gives ``stats.inputs`` = float64 :class:`InputStatistics` with X^T X
    (and so ``sq_sum``, its diagonal), ``"mean_abs"`` one with the per-column sums of ``|x|`` and
    ``x²`` (alone: no Gram; without it: no ``|x|`` sums), ``"fisher"`` gives ``stats.fisher``,
    ``"original"`` gives ``stats.original``: the layer's weight as it was before this block's
    first step (kept until the block is done, so a compensating step sees what the earlier steps
    changed).
    Optional ``measure(name, layer, stats)`` + ``allocate()``: the two-pass protocol above.
    Optional ``stats_dtype``: the dtype its input statistics accumulate in (float64 unless the
    step says float32, as the OBS steps do: their Gram is damped anyway and float32 halves
    the time of the largest cost of a calibration pass).
    Optional ``prepare(model, names)``: called once before the block walk with the step's
    targets inside the blocks (e.g. one global threshold over all of them).
    Optional ``sequential``: ``"block"`` when the step's results were measured better with its
    statistics taken on the unmodified block (see :func:`choose_sequential`); else ``"layer"``.
    Optional ``stats_precision``: ``"bfloat16"`` when its results were measured unchanged with
    its block-order statistics forward in bfloat16 (:func:`stats_precision_for`); else
    ``"float32"``."""

    targets: Targets
    needs: frozenset[str]

    def apply(self, name: str, layer: nn.Module, stats: LayerStats) -> nn.Module: ...


SEQUENTIAL = ("layer", "block")
HEAP = ("trim", "keep", "default")
STATS_PRECISION = ("auto", "float32", "bfloat16")


def stats_precision_for(step, option: str, device) -> torch.dtype | None:
    """The dtype of ``step``'s block-order statistics forward: bfloat16 for ``option="bfloat16"``,
    float32 (None) for ``"float32"``; ``"auto"``: bfloat16 when the step allows it
    (``step.stats_precision``) and ``device`` multiplies bfloat16 natively
    (:func:`~slimtune.calib.blocks.fast_bfloat16`). The block's outputs, which carry the
    compression error to the next block, are always computed in the model's dtype."""
    if option == "bfloat16" or (option == "auto" and fast_bfloat16(device) and
                                getattr(step, "stats_precision", "float32") == "bfloat16"):
        return torch.bfloat16
    return None


def choose_sequential(steps) -> str:
    """The order ``sequential=None`` runs: ``"block"`` if a step that reads calibration inputs
    asks for it (``step.sequential``), else ``"layer"`` (one forward per block, the faster)."""
    for step in steps:
        wanted = getattr(step, "sequential", "layer")
        if wanted not in SEQUENTIAL:
            raise ValueError(f"{type(step).__name__}.sequential must be one of {SEQUENTIAL}, "
                             f"got {wanted!r}")
        if wanted == "block" and frozenset(getattr(step, "needs", ())) & STAT_KINDS:
            return "block"
    return "layer"


def run_pipeline(model: nn.Module, windows: torch.Tensor, steps, batch_size: int = 2,
                 progress: bool = True, heap: str = "trim", sequential: str | None = None,
                 stats_precision: str = "auto") -> dict:
    """Compress ``model`` in place block by block with ``steps`` (see the module docstring).

    ``sequential="layer"``: one forward per block, each target getting all its steps once every
    batch has reached it (:mod:`slimtune.calib.staged`); ``"block"``: per step a forward
    collecting the statistics of all the block's targets, then one for the block's outputs
    (less memory: one batch's activations alive instead of all batches'); ``None`` (default):
    :func:`choose_sequential` of the steps. ``stats_precision``: the block order's statistics
    forwards (:func:`stats_precision_for`; the per-step choice is reported). Blocks after the
    last one in which a step reads calibration inputs (``"gram"``/``"mean_abs"``) are not run:
    their steps are applied directly (a data-free recipe such as RTN or magnitude runs no
    forward at all).

    ``batch_size`` windows run per block forward (batch 2: the peak within 15% of model + one
    block's activations and statistics, net of the interpreter, in the block order; batch 8 was
    46% over it at the same speed). ``heap="trim"`` (default): glibc's free heap pages go back to
    the OS after every block (:func:`trim_heap`); ``"keep"``: glibc keeps freed memory for reuse
    during the walk (:func:`keep_heap`, process-wide) and hands it back once at the end (measured
    0.91-0.98 of the time at a 1.2x higher peak in the layer order); ``"default"``: left to glibc
    (BENCHMARKS.md, pipeline memory).

    Returns ``{"blocks", "n_blocks", "windows", "steps": [{"step", "kind", "layers" (names
    applied), "replaced" (names whose module changed), "stats_precision" (the dtype of its
    block-order statistics forwards, e.g. "bfloat16" or "float32"; else None), "outside_blocks"
    (matched names not in a block: left alone), "fallbacks" ({name: message} of the layers whose
    apply needed a numerical fallback, e.g. extra damping; summarised in one warning), "seconds"
    (its applies),
    "peak_rss_mb"}], "sequential", "capture_seconds", "fisher_seconds", "measure_seconds",
    "forward_seconds" (the compressing pass's block forwards and statistics), "seconds",
    "peak_rss_mb"}``.
    """
    start = time.perf_counter()
    if windows.ndim != 2 or windows.dtype != torch.long:
        raise ValueError(f"windows must be a LongTensor [n, seqlen], got {windows.dtype} "
                         f"{tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = list(steps)
    if heap not in HEAP:
        raise ValueError(f"heap must be one of {HEAP}, got {heap!r}")
    if stats_precision not in STATS_PRECISION:
        raise ValueError(f"stats_precision must be one of {STATS_PRECISION}, "
                         f"got {stats_precision!r}")
    if sequential is None:
        sequential = choose_sequential(steps)
    elif sequential not in SEQUENTIAL:
        raise ValueError(f"sequential must be 'layer', 'block' or None, got {sequential!r}")
    prefix, blocks = find_blocks(model)
    per_step = validate_steps(model, steps, prefix, len(blocks))
    fisher_names = sorted({n for needs, bb in per_step if "fisher" in needs for b in bb for n in b})
    if fisher_names and not is_causal_lm(model):
        raise ValueError(f"a step needs 'fisher', which needs a causal LM; {type(model).__name__}"
                         " is not one")
    # blocks after the last one a step reads calibration inputs in are not run at all
    last_data = max((i for needs, bb in per_step if needs & STAT_KINDS
                     for i, names in enumerate(bb) if names), default=-1)
    two_pass = [k for k, s in enumerate(steps)
                if callable(getattr(s, "measure", None)) and callable(getattr(s, "allocate", None))]
    warn_small_calibration(model, steps, per_step, windows)
    report = {"blocks": prefix, "n_blocks": len(blocks), "windows": list(windows.shape),
              "steps": [{"step": k, "kind": type(s).__name__, "layers": [], "replaced": [],
                         "stats_precision": None,
                         "outside_blocks": [n for n in match_targets(model, s.targets)
                                            if not n.startswith(prefix + ".")],
                         "fallbacks": {}, "seconds": 0.0, "peak_rss_mb": 0.0}
                        for k, s in enumerate(steps)],
              "sequential": sequential, "fisher_seconds": 0.0, "measure_seconds": 0.0,
              "capture_seconds": 0.0, "forward_seconds": 0.0}
    windows = windows.to(model_device(model))
    was_training = model.training
    model.eval()
    fisher = {}
    if fisher_names:
        t = time.perf_counter()
        fisher = fisher_diagonals(model, windows, fisher_names, progress=progress)
        report["fisher_seconds"] = time.perf_counter() - t

    originals: dict[str, torch.Tensor] = {}

    def stats_for(name, needs, inputs):
        return LayerStats(inputs.get(name) if needs & STAT_KINDS else None,
                          fisher.get(name) if "fisher" in needs else None,
                          originals.get(name) if "original" in needs else None)

    def apply(k: int, name: str, layer: nn.Module, stats: LayerStats) -> nn.Module:
        step, entry = steps[k], report["steps"][k]
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            try:
                new = step.apply(name, layer, stats)
            except ValueError as err:
                raise ValueError(f"step {k} ({type(step).__name__}) on {name}: {err}") from err
        for w in caught:
            if issubclass(w.category, RuntimeWarning):
                entry["fallbacks"][name] = str(w.message)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if not isinstance(new, nn.Module):
            raise TypeError(f"step {k} ({type(step).__name__}).apply returned "
                            f"{type(new).__name__} for {name}, not a module")
        entry["layers"].append(name)
        if new is not layer:
            entry["replaced"].append(name)
        entry["seconds"] += time.perf_counter() - t
        entry["peak_rss_mb"] = peak_rss_mb()
        return new

    def walk_block_staged(i: int) -> None:
        """One forward of block i; every target gets all its steps when the batches reach it."""
        order = blocks_targets(i)
        todo = {n: [k for k, (_, bb) in enumerate(per_step) if n in bb[i]] for n in order}
        track = hooks_for(([n], per_step[k][0]) for n, ks in todo.items() for k in ks)
        dtypes = {getattr(steps[k], "stats_dtype", torch.float64) for ks in todo.values()
                  for k in ks if per_step[k][0] & STAT_KINDS}
        dtype = torch.float64 if torch.float64 in dtypes or not dtypes else torch.float32

        t, applying = time.perf_counter(), sum(e["seconds"] for e in report["steps"])
        run_staged(walker, i, order, track, dtype, partial(compress_layer, i))
        applying = sum(e["seconds"] for e in report["steps"]) - applying
        report["forward_seconds"] += time.perf_counter() - t - applying

    def compress_layer(i: int, name: str, layer: nn.Module, inputs) -> nn.Module:
        """Every step of block i that targets ``name``, in recipe order, on one set of inputs."""
        ks = [k for k, (_, bb) in enumerate(per_step) if name in bb[i]]
        if any("original" in per_step[k][0] for k in ks):
            originals[name] = dense_weight(layer).clone()
        for k in ks:
            layer = apply(k, name, layer, stats_for(name, per_step[k][0], {name: inputs}))
        originals.pop(name, None)
        return layer

    def walk_block_direct(i: int) -> None:
        """No step of block i or later reads calibration inputs: apply, no forward."""
        for name in blocks_targets(i):
            set_module(model, name, compress_layer(i, name, model.get_submodule(name), None))

    def walk_block_per_step(i: int) -> None:
        """Per step: a forward of block i collecting its statistics, then its apply."""
        originals.update({n: dense_weight(model.get_submodule(n)).clone()
                          for needs, by_block in per_step if "original" in needs
                          for n in by_block[i]})
        for k, (step, (needs, by_block)) in enumerate(zip(steps, per_step)):
            if not by_block[i]:
                continue
            t = time.perf_counter()
            hooks = hooks_for([(by_block[i], needs)])
            precision = stats_precision_for(step, stats_precision, walker.inps.device)
            if hooks:
                dtype = precision or next(blocks[i].parameters()).dtype
                report["steps"][k]["stats_precision"] = str(dtype).removeprefix("torch.")
            inputs = (walker.run(i, f"step {k} stats", hooks,
                                 stats_dtype=getattr(step, "stats_dtype", torch.float64),
                                 precision=precision)
                      if hooks else {})
            report["forward_seconds"] += time.perf_counter() - t
            for name in by_block[i]:
                new = apply(k, name, model.get_submodule(name), stats_for(name, needs, inputs))
                set_module(model, name, new)
            del inputs

    def blocks_targets(i: int) -> list[str]:
        names = {n for _, bb in per_step for n in bb[i]}
        return [n for n, _ in model.named_modules() if n in names]

    for step, (needs, by_block) in zip(steps, per_step):
        if callable(getattr(step, "prepare", None)):
            step.prepare(model, [n for b in by_block for n in b])
    bar, block_task = progress_bar(len(blocks) * (1 + bool(two_pass)), "blocks", progress)
    batch_task = bar.add_task("batches", total=len(windows))
    walker = BlockRunner(model, blocks, windows, batch_size, bar, batch_task)
    try:
        with bar, torch.no_grad():
            if two_pass:  # measuring pass: original layers, original block outputs
                t = time.perf_counter()
                walker.capture()
                for i in range(len(blocks)):
                    sel = [(k, per_step[k][1][i], per_step[k][0]) for k in two_pass]
                    inputs = walker.run(i, "measure", hooks_for(s[1:] for s in sel), keep=True)
                    for k, names, needs in sel:
                        for name in names:
                            steps[k].measure(name, model.get_submodule(name),
                                             stats_for(name, needs, inputs))
                    del inputs
                    walker.advance()
                    bar.advance(block_task)
                for k in two_pass:
                    steps[k].allocate()
                report["measure_seconds"] = time.perf_counter() - t
            if heap == "keep":
                keep_heap()
            t = time.perf_counter()
            if last_data >= 0:
                walker.capture()
                check_finite(walker.inps, "the embeddings (inputs of block 0)")
            report["capture_seconds"] = time.perf_counter() - t
            for i in range(len(blocks)):
                if i > last_data:
                    walk_block_direct(i)
                elif sequential == "layer":
                    walk_block_staged(i)
                else:
                    walk_block_per_step(i)
                    if i < last_data:
                        t = time.perf_counter()
                        walker.run(i, "outputs", keep=True)
                        report["forward_seconds"] += time.perf_counter() - t
                if i < last_data:
                    check_finite(walker.outs, f"block {i} (compressed)")
                    walker.advance()
                for needs, by_block in per_step:
                    for name in by_block[i]:
                        fisher.pop(name, None)
                originals = {}
                if heap == "trim":
                    trim_heap()
                bar.advance(block_task)
    finally:
        walker.inps = walker.outs = None
        model.train(was_training)
        if heap == "keep":
            trim_heap()  # the pages kept for the blocks go back once, at the end
    for entry in report["steps"]:
        if entry["fallbacks"]:
            name, message = next(iter(entry["fallbacks"].items()))
            warn(f"step {entry['step']} ({entry['kind']}): {len(entry['fallbacks'])} of "
                 f"{len(entry['layers'])} layers needed a numerical fallback (e.g. {name}: "
                 f"{message}); more or longer calibration windows usually avoid it")
    report["seconds"] = time.perf_counter() - start
    report["peak_rss_mb"] = peak_rss_mb()
    return report
