"""The fine-tuning loop: adapters (any registered method) or full fine-tuning, on any task.

:func:`train` does, for ``config.steps`` optimiser steps:

1. The adapter method's ``before_step`` hook runs (DyLoRA draws the step's rank), then
   ``grad_accum`` micro-batches of ``batch`` examples from the task's seeded order; each
   backpropagates ``loss_i / grad_accum``, so the gradient is that of the mean loss over the
   ``batch * grad_accum`` examples (:func:`accumulate_gradients`).
2. The adapter method's own loss term, if it has one (``slimtune.adapt.extra_loss``, e.g. SORSA's
   orthonormal regulariser), is computed after each micro-batch's forward (so it may read that
   forward's outputs, as BA-LoRA's output regularisers do) and backpropagated with that
   micro-batch's loss, averaged like it; the method's ``after_backward`` hook
   (importance scores that read the gradients) and the training hooks' ``after_backward``
   run (:mod:`.hooks`: TRP's nuclear-norm sub-gradient).
3. The global gradient norm is clipped to ``max_grad_norm``; the optimiser (``config.optimizer``,
   AdamW by default, :mod:`.optimizers`; over the trainable parameters only) steps at the
   warmup-cosine learning rate (:mod:`.schedule`) (:func:`optimizer_step`).
4. The method's ``after_step`` hook runs with the number of optimiser steps done so far (1 after
   the first step), then the training hooks' ``after_step``.
5. Every ``eval_every`` steps and after the last one the task evaluates on held-out data
   (perplexity or accuracy); every ``save_every`` steps a checkpoint is written (:mod:`.state`),
   with the method's training state (``slimtune.adapt.method_state``).
6. When the last step is done the method's ``finish`` hook runs (pruned ranks dropped), then
   the result is written.

Under ``torchrun`` every process runs this loop on its shard of each batch and DDP averages the
gradients (:mod:`.distributed`); rank 0 evaluates and writes. The loop never looks at the
method's or optimiser's name: everything method-specific is in the hooks. With
``adapter=None`` every parameter trains (full fine-tuning, the reference row). Resuming from the
latest checkpoint restores weights, optimizer, scheduler, RNG states and data position, so the
run continues exactly as if it had not stopped. The history (per step: loss, lr, gradient norm,
seconds, peak RSS, evaluations) is returned and written to ``OUT/history.json`` with the result.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from slimtune import adapt
from slimtune.adapt.registry import AdapterConfig
from slimtune.evaluate import peak_rss_mb
from slimtune.progress import note, progress_bar
from slimtune.train import state as files
from slimtune.train import distributed
from slimtune.train.checks import check_calibration, check_compatibility, check_resume
from slimtune.train.config import TrainConfig
from slimtune.train.hooks import make_hooks, run_hooks
from slimtune.train.optimizers import build as build_optimizer
from slimtune.train.schedule import warmup_cosine


def accumulate_gradients(model: nn.Module, task, micro_batches: list, extra=None) -> float:
    """Backpropagate the mean of the micro-batches' losses; return that mean (a float). Under
    DDP (``model`` has ``no_sync``) the gradients are averaged over the processes once, in the
    last micro-batch's backward. ``extra()`` (optional) is called after each micro-batch's
    forward; the term it returns (or None) is backpropagated with that micro-batch's loss."""
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            loss = task.loss(model, batch)
            term = None if extra is None else extra()
            ((loss if term is None else loss + term) / len(micro_batches)).backward()
        total += loss.item()
    return total / len(micro_batches)


def step_gradients(model: nn.Module, task, batches: list, with_adapter: bool,
                   runner: nn.Module | None = None) -> tuple[float, float | None]:
    """The step's gradients: the micro-batches' mean loss (through ``runner``, the DDP wrapper
    of ``model`` if any) plus the adapter's extra loss (if its method has one), computed after
    each micro-batch's forward and averaged alike; ``(loss, mean extra loss or None)``."""
    extras = []

    def extra():
        term = adapt.extra_loss(model)
        if term is not None:
            extras.append(float(term.detach()))
        return term

    loss = accumulate_gradients(model if runner is None else runner, task, batches,
                                extra if with_adapter else None)
    return loss, (sum(extras) / len(extras) if extras else None)


def optimizer_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler,
                   max_grad_norm: float | None, regrade=None) -> float:
    """Clip the gradients' global norm to ``max_grad_norm`` (None: no clipping), step optimizer
    and scheduler, zero the gradients; return the norm before clipping. An optimiser that takes
    a second gradient per step (``needs_closure``: SAM) gets a closure that zeroes the
    gradients, calls ``regrade()`` (the step's loss and backward again, on the same batches, at
    the weights the optimiser moved to) and clips again."""
    limit = math.inf if max_grad_norm is None else max_grad_norm
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    if getattr(optimizer, "needs_closure", False):
        if regrade is None:
            raise ValueError(f"{type(optimizer).__name__} needs the step's batches again")

        def closure():
            optimizer.zero_grad(set_to_none=True)
            loss = regrade()
            torch.nn.utils.clip_grad_norm_(params, limit)
            return loss
        optimizer.step(closure)
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(norm)


def state_megabytes(state) -> float:
    """MB (2**20 bytes) of every tensor in ``state`` (an optimiser's ``state_dict``)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() / 2**20
    if isinstance(state, dict):
        return sum(state_megabytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_megabytes(v) for v in state)
    return 0.0


def _setup_model(model: nn.Module, task, config: TrainConfig, adapter: AdapterConfig | None,
                 checkpoint: Path | None, progress: bool, hooks: list,
                 train_rest: bool = False) -> nn.Module:
    """The task's model with the adapter applied (or restored) and only its parameters
    trainable (with ``train_rest``: every parameter outside the adapted layers too); the
    training hooks' ``setup`` has run on it (before a full checkpoint's weights are restored,
    after an adapter's)."""
    if adapter is None and files.has_adapter(model):
        raise ValueError("the model already carries an adapter: pass adapter=<config> and a plain "
                         "base model (train applies it), or merge it first")
    model = task.prepare_model(model, seed=config.seed)
    if adapter is None:
        model.requires_grad_(True)
        run_hooks(hooks, "setup", model)
        return model if checkpoint is None else files.restore_weights(model, checkpoint, False)
    if checkpoint is not None:
        model = files.restore_weights(model, checkpoint, True)
        run_hooks(hooks, "setup", model)
        return model
    calib = (task.calibration(config.calib_n, config.seed, config.calib_data)
             if adapt.needs_calibration(adapter.method) else None)
    params = adapter.model_dump(exclude={"method"})
    adapt.apply(model, adapter.method, calib=calib, progress=progress, **params)
    for name in task.full_train_modules:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"targets {adapter.targets!r} wrapped {name!r}, which trains in "
                             "full: leave it out of the targets")
        module.requires_grad_(True)
    if train_rest:
        adapted = tuple(f"{name}." for name in model.slimtune_adapter["layers"])
        for name, p in model.named_parameters():
            if not name.startswith(adapted):
                p.requires_grad_(True)
    run_hooks(hooks, "setup", model)
    return model


def _new_history(model: nn.Module, config: TrainConfig, adapter: AdapterConfig | None,
                 params: list[nn.Parameter], meta: dict) -> dict:
    hf_config = getattr(model, "config", None)
    effective = {**config.model_dump(mode="json"), "seqlen": config.window,
                 "global_batch": config.batch * config.grad_accum * meta["world_size"]}
    if adapter is not None and adapt.needs_calibration(adapter.method):
        effective["calib_data"] = config.calib_data or config.data
    return {"model": getattr(hf_config, "_name_or_path", None),
            "mode": "full" if adapter is None else "adapter",
            "config": effective,
            "adapter": None if adapter is None else adapter.model_dump(mode="json"),
            "trainable_parameters": sum(p.numel() for p in params),
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(), **meta, "resumed_at": [], "steps": []}


def train(model: nn.Module, task, config: TrainConfig, out: str | os.PathLike,
          adapter: AdapterConfig | None = None, resume: bool = False, overwrite: bool = False,
          progress: bool = True, meta: dict | None = None, merge_adapter: bool = False,
          train_rest: bool = False) -> tuple[nn.Module, dict]:
    """Fine-tune ``model`` on ``task`` (see the module docstring); return ``(trained model,
    history)``.

    ``model`` is a plain base model; it is modified in place (the adapter is applied to it, or
    restored on it from the checkpoint when resuming, or all its parameters are unfrozen). The
    returned model is the task's model around it (a classifier wraps an encoder). ``out`` must not
    hold files unless ``resume`` or ``overwrite`` (see :func:`check_resume`); with ``resume`` and
    no checkpoint yet, training starts afresh. ``meta`` (JSON-able) is stored with checkpoints
    and must match on resume, as the world size does. ``merge_adapter`` folds the adapter into
    the model before the final write (a model directory instead of an adapter); ``train_rest``
    trains every parameter outside the adapted layers beside the adapter (embeddings and norms
    when pretraining with a factored method; saved with the adapter). Under torchrun
    this is one data-parallel process (:mod:`.distributed`).
    """
    world, rank = distributed.start(), distributed.rank()
    meta = {"world_size": world, **(meta or {})}
    check_calibration(config, adapter)
    check_compatibility(config, adapter)
    hooks = make_hooks(config.hooks)
    checkpoint = check_resume(out, config, adapter, resume, overwrite, meta)
    saved = files.read_state(checkpoint) if checkpoint is not None else None
    main = rank == 0
    distributed.barrier()  # every process has read ``out`` before rank 0 claims it
    if main:
        files.claim(out, fresh=checkpoint is None)
    progress = progress and main
    if resume and checkpoint is None and main:
        note(f"{out}: no checkpoint to resume from yet; starting at step 0")
    model = _setup_model(model, task, config, adapter, checkpoint, progress, hooks,
                         train_rest)
    if world > 1 and torch.cuda.is_available():
        model.cuda()
    with_adapter = adapter is not None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the model has no trainable parameters")
    optimizer = build_optimizer(config.optimizer, model, **config.optimizer_keys())
    scheduler = warmup_cosine(optimizer, config.steps, config.warmup, config.min_lr_ratio)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        task.load_state_dict(saved["data"])
        if with_adapter:
            adapt.method_state(model).update(saved.get("method_state") or {})
        files.set_rng_state(saved["rng"])
        history, start = saved["history"], saved["step"]
        history["resumed_at"].append(start)
        if main:
            note(f"resumed from step {start} of {config.steps} ({checkpoint})")
    else:
        torch.manual_seed(config.seed)
        history, start = _new_history(model, config, adapter, params, meta), 0
    if with_adapter:  # schedules that end with the run (AdaLoRA's budget) read it
        adapt.method_state(model)["total_steps"] = config.steps
    runner = distributed.wrap(model)

    model.train()
    bar, bar_task = progress_bar(config.steps, "train", progress)
    bar.update(bar_task, completed=start)
    with bar:
        for step in range(start, config.steps):
            began = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            if with_adapter:
                adapt.before_step(model, step)
            batches = [distributed.shard(task.next_batch(config.batch * world), rank, world,
                                         config.batch) for _ in range(config.grad_accum)]
            loss, extra = step_gradients(model, task, batches, with_adapter, runner)
            loss = distributed.mean_over_processes(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step + 1}: the loss is {loss} (try a lower lr)")
            if with_adapter:
                adapt.after_backward(model, step)
            run_hooks(hooks, "after_backward", model, step)
            record = {"step": step + 1, "loss": loss, "lr": lr}
            if extra is not None:
                record["extra_loss"] = extra
            record["grad_norm"] = optimizer_step(
                params, optimizer, scheduler, config.max_grad_norm,
                lambda: step_gradients(model, task, batches, with_adapter, runner)[0])
            if with_adapter:
                adapt.after_step(model, step + 1, optimizer)
            run_hooks(hooks, "after_step", model, step + 1, optimizer)
            record["seconds"] = time.perf_counter() - began
            record["peak_rss_mb"] = peak_rss_mb()
            done = step + 1
            if main and (done == config.steps or (config.eval_every and
                                                  done % config.eval_every == 0)):
                record["eval"] = task.evaluate(model)
            history["steps"].append(record)
            tokens = config.batch * config.grad_accum * config.window * world  # at most
            bar.update(bar_task, advance=1, description=f"train loss {loss:.4f} lr {lr:.2e} "
                       f"{tokens / record['seconds']:.0f} tokens/s")
            if main and config.save_every and done % config.save_every == 0 and \
                    done < config.steps:
                files.write_checkpoint(out, done, model, {
                    "step": done, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "data": task.state_dict(),
                    "rng": files.rng_state(), "history": history,
                    "method_state": adapt.method_state(model) if with_adapter else None},
                    run={"config": config.model_dump(mode="json"), "adapter": history["adapter"],
                         "meta": meta})

    seconds = [r["seconds"] for r in history["steps"]]
    history.update(finished=True, final_eval=history["steps"][-1].get("eval"),
                   seconds_per_step=statistics.median(seconds), peak_rss_mb=peak_rss_mb(),
                   optimizer_state_mb=state_megabytes(optimizer.state_dict()))
    if with_adapter:
        adapt.finish(model)
    run_hooks(hooks, "finish", model)
    if merge_adapter and with_adapter:
        adapt.merge(model)
    if main:
        files.write_final(out, model, task.tokenizer, history)
    distributed.barrier()
    return model, history
