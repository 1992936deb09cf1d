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
2. For each block in order, for each step in order: forward pre-hooks on the block's linears that
   the step targets accumulate the statistics it ``needs`` (:class:`InputStatistics`, over all
   windows in batches of ``batch_size``) while the block runs; then ``step.apply(name, layer,
   stats)`` returns each layer's replacement, set in place. A later step therefore sees the
   earlier steps' replacements (its statistics are re-collected on the modified block).
3. The (compressed) block runs once more; its outputs are the next block's inputs (the two
   buffers are swapped, so memory does not grow with depth). Statistics are freed per block.

Steps needing ``"fisher"`` get the Fisher diagonal of the calibration LM loss, computed once before
the block walk by :func:`fisher_diagonals` on the original full model (causal LMs only). A step
with ``measure`` and ``allocate`` (global rank allocation) gets a measuring pass first: every block
runs unchanged on the original outputs, ``measure`` is called for all its targets, then
``allocate()``, then the compressing pass above. Targets are matched (``match_targets``, full
names) once on the original model; only linears inside the block list are handled.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from slimtune.block_runner import BlockRunner, trim_heap
from slimtune.evaluate import _model_device, peak_rss_mb, tokenize_text
from slimtune.layers import FactoredLinear
from slimtune.targets import Targets, match_targets
from slimtune.progress import progress_bar
from slimtune.weights.stats import FisherDiagonal, InputStatistics

NEEDS = frozenset({"gram", "mean_abs", "fisher"})


class UnsupportedArchitectureError(ValueError):
    """The model has no block list the pipeline can walk."""


@dataclass
class LayerStats:
    inputs: InputStatistics | None  # over this layer's inputs (all calibration tokens)
    fisher: torch.Tensor | None  # [out, in] mean squared gradient of the calibration LM loss


@runtime_checkable
class BlockStep(Protocol):
    """A compression step. ``targets`` as for ``match_targets`` (full model names); ``needs`` ⊆
    :data:`NEEDS`: ``"gram"`` gives ``stats.inputs`` = float64 :class:`InputStatistics` with X^T X,
    ``"mean_abs"`` alone one without (``track_gram=False``), ``"fisher"`` gives ``stats.fisher``.
    Optional ``measure(name, layer, stats)`` + ``allocate()``: the two-pass protocol above."""

    targets: Targets
    needs: frozenset[str]

    def apply(self, name: str, layer: nn.Module, stats: LayerStats) -> nn.Module: ...


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)``: the model's list of transformer blocks (e.g. ``"model.layers"``)."""
    for path in ("model.layers", "encoder.layer"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return path, blocks
    best = None  # generic: the largest ModuleList of same-type modules that contain linears
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or not len(m) or len({type(b) for b in m}) != 1:
            continue
        if not all(any(isinstance(x, (nn.Linear, FactoredLinear)) for x in b.modules()) for b in m):
            continue
        size = (len(m), sum(p.numel() for p in m.parameters()))
        if best is None or size > best[0]:
            best = (size, path, m)
    if best is None:
        raise UnsupportedArchitectureError(
            f"cannot walk {type(model).__name__}: the layer-by-layer pipeline needs the "
            "transformer blocks as an nn.ModuleList of identical modules containing linear "
            "layers (like 'model.layers' in Llama-family decoders or 'encoder.layer' in BERT); "
            "none found")
    return best[1], best[2]


def calibration_windows(tokenizer, data: str = "ptb", split: str = "train", n: int = 128,
                        seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """``n`` random non-overlapping windows [n, seqlen] of the tokenized split (seeded)."""
    from slimtune.data import load_text

    ids = tokenize_text(tokenizer, load_text(data, split))
    slots = ids.numel() // seqlen
    if n < 1 or seqlen < 2 or n > slots:
        raise ValueError(f"need 1 <= n <= {slots} windows of seqlen >= 2 from {data}/{split} "
                         f"({ids.numel()} tokens); got n={n}, seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, ids.numel() - slots * seqlen + 1, (1,), generator=g))
    grid = ids[offset:offset + slots * seqlen].view(slots, seqlen)
    return grid[torch.randperm(slots, generator=g)[:n]].clone()


def _is_causal_lm(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return type(model).__name__.endswith("ForCausalLM") or bool(callable(can_generate)
                                                                 and can_generate())


def _take_grad(acc: FisherDiagonal, weight: torch.Tensor) -> None:
    acc.update(weight.grad)
    weight.grad = None


def fisher_diagonals(model: nn.Module, windows: torch.Tensor, names, batch_size: int = 1,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Per named linear, the mean over batches of grad² of the causal-LM loss w.r.t. its weight.

    ``model(input_ids=batch, labels=batch).loss`` (mean next-token NLL of the batch) is
    back-propagated once per batch with only the named weights requiring gradients; each weight's
    gradient is squared into a float32 :class:`FisherDiagonal` as soon as it is ready and dropped,
    so only one gradient exists at a time. Returns ``{name: [out, in]}`` on the model's device.
    """
    if not len(windows) or batch_size < 1:
        raise ValueError(f"need at least one window and batch_size >= 1, got {len(windows)}, "
                         f"{batch_size}")
    if not _is_causal_lm(model):
        raise ValueError(f"Fisher diagonals need a causal LM (loss on next tokens); "
                         f"{type(model).__name__} is not one (an encoder has no LM loss)")
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    old_grads = {n: w.grad for n, w in weights.items()}
    acc = {n: FisherDiagonal(w.shape, torch.float32, w.device) for n, w in weights.items()}
    windows = windows.to(_model_device(model))
    was_training = model.training
    model.eval()
    bar, task = progress_bar(len(windows), f"fisher ({len(windows)}×{windows.shape[1]})", progress)
    handles = []
    try:
        for p in flags:
            p.requires_grad_(False)
        for n, w in weights.items():
            w.requires_grad_(True)
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(partial(_take_grad, acc[n])))
        with bar, torch.enable_grad():
            for s in range(0, len(windows), batch_size):
                batch = windows[s:s + batch_size]
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
                bar.advance(task, len(batch))
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for n, w in weights.items():
            w.grad = old_grads[n]
        model.train(was_training)
    # divide in place (no second copy of every Fisher matrix), dropping each accumulator as we go
    return {n: (a := acc.pop(n)).sq_grad_sum.div_(a.count) for n in list(acc)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _hooks_for(pairs) -> dict:
    """{name: track_gram} for the (names, needs) pairs that need input statistics."""
    hooks = {}
    for names, needs in pairs:
        for n in names if needs & {"gram", "mean_abs"} else ():
            hooks[n] = hooks.get(n, False) or "gram" in needs
    return hooks


def _validate(model, steps, prefix: str, n_blocks: int):
    """Per step, per block, the target names; raises ValueError naming a bad step."""
    per_step = []
    for k, step in enumerate(steps):
        label = f"step {k} ({type(step).__name__})"
        if not callable(getattr(step, "apply", None)) or not hasattr(step, "targets"):
            raise ValueError(f"{label}: a step needs `targets` and an `apply(name, layer, stats)`")
        needs = frozenset(getattr(step, "needs", frozenset()))
        if needs - NEEDS:
            raise ValueError(f"{label}: unknown needs {sorted(needs - NEEDS)}; "
                             f"known: {sorted(NEEDS)}")
        try:
            names = match_targets(model, step.targets)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from err
        if not names:
            raise ValueError(f"{label}: targets {step.targets!r} match no linear layer in "
                             f"{type(model).__name__}")
        by_block = [[n for n in names if n.startswith(f"{prefix}.{i}.")] for i in range(n_blocks)]
        if not any(by_block):
            raise ValueError(f"{label}: targets {step.targets!r} match no linear inside the "
                             f"blocks '{prefix}' (matched only {names[:3]})")
        per_step.append((needs, by_block))
    return per_step


def run_pipeline(model: nn.Module, windows: torch.Tensor, steps, batch_size: int = 2,
                 progress: bool = True, heap: str = "trim") -> dict:
    """Compress ``model`` in place block by block with ``steps`` (see the module docstring).

    ``batch_size`` windows run per block forward; with ``heap="trim"`` glibc's free heap pages go
    back to the OS after every block (:func:`trim_heap`; ``"default"``: left to glibc). These
    defaults (batch 2, trim) keep the peak within 15% of model + one block's activations and
    statistics (net of the interpreter), where batch 8 was measured 46% over it, at the same speed
    (BENCHMARKS.md, pipeline memory).

    Returns ``{"blocks", "n_blocks", "windows", "steps": [{"step", "kind", "layers" (names
    applied), "replaced" (names whose module changed), "outside_blocks" (matched names not in a
    block: left alone), "seconds", "peak_rss_mb"}], "capture_seconds",
    "fisher_seconds", "measure_seconds", "seconds", "peak_rss_mb"}``.
    """
    start = time.perf_counter()
    if windows.ndim != 2 or windows.dtype != torch.long:
        raise ValueError(f"windows must be a LongTensor [n, seqlen], got {windows.dtype} "
                         f"{tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = list(steps)
    if heap not in ("trim", "default"):
        raise ValueError(f"heap must be 'trim' or 'default', got {heap!r}")
    prefix, blocks = find_blocks(model)
    per_step = _validate(model, steps, prefix, len(blocks))
    fisher_names = sorted({n for needs, bb in per_step if "fisher" in needs for b in bb for n in b})
    if fisher_names and not _is_causal_lm(model):
        raise ValueError(f"a step needs 'fisher', which needs a causal LM; {type(model).__name__}"
                         " is not one")
    two_pass = [k for k, s in enumerate(steps)
                if callable(getattr(s, "measure", None)) and callable(getattr(s, "allocate", None))]
    report = {"blocks": prefix, "n_blocks": len(blocks), "windows": list(windows.shape),
              "steps": [{"step": k, "kind": type(s).__name__, "layers": [], "replaced": [],
                         "outside_blocks": [n for n in match_targets(model, s.targets)
                                            if not n.startswith(prefix + ".")],
                         "seconds": 0.0, "peak_rss_mb": 0.0} for k, s in enumerate(steps)],
              "fisher_seconds": 0.0, "measure_seconds": 0.0, "capture_seconds": 0.0}
    windows = windows.to(_model_device(model))
    was_training = model.training
    model.eval()
    fisher = {}
    if fisher_names:
        t = time.perf_counter()
        fisher = fisher_diagonals(model, windows, fisher_names, progress=progress)
        report["fisher_seconds"] = time.perf_counter() - t

    def stats_for(name, needs, inputs):
        return LayerStats(inputs.get(name) if needs & {"gram", "mean_abs"} else None,
                          fisher.get(name) if "fisher" in needs else None)

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
                    inputs = walker.run(i, "measure", _hooks_for(s[1:] for s in sel), keep=True)
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
            t = time.perf_counter()
            walker.capture()
            report["capture_seconds"] = time.perf_counter() - t
            for i in range(len(blocks)):
                for k, (step, (needs, by_block)) in enumerate(zip(steps, per_step)):
                    names, entry = by_block[i], report["steps"][k]
                    if not names:
                        continue
                    t = time.perf_counter()
                    hooks = _hooks_for([(names, needs)])
                    inputs = walker.run(i, f"step {k} stats", hooks) if hooks else {}
                    for name in names:
                        layer = model.get_submodule(name)
                        new = step.apply(name, layer, stats_for(name, needs, inputs))
                        if not isinstance(new, nn.Module):
                            raise TypeError(f"step {k} ({type(step).__name__}).apply returned "
                                            f"{type(new).__name__} for {name}, not a module")
                        _set_module(model, name, new)
                        entry["layers"].append(name)
                        if new is not layer:
                            entry["replaced"].append(name)
                    del inputs
                    entry["seconds"] += time.perf_counter() - t
                    entry["peak_rss_mb"] = peak_rss_mb()
                if i + 1 < len(blocks):
                    walker.run(i, "outputs", keep=True)
                    walker.advance()
                for needs, by_block in per_step:
                    for name in by_block[i]:
                        fisher.pop(name, None)
                if heap == "trim":
                    trim_heap()
                bar.advance(block_task)
    finally:
        walker.inps = walker.outs = None
        model.train(was_training)
    report["seconds"] = time.perf_counter() - start
    report["peak_rss_mb"] = peak_rss_mb()
    return report
