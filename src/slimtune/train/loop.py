"""The fine-tuning loop: adapters (any registered method) or full fine-tuning, on any task.

:func:`train` does, for ``config.steps`` optimiser steps:

1. ``grad_accum`` micro-batches of ``batch`` examples from the task's seeded order; each
   backpropagates ``loss_i / grad_accum``, so the gradient is that of the mean loss over the
   ``batch * grad_accum`` examples (:func:`accumulate_gradients`).
2. The adapter method's own loss term, if it has one (``slimtune.adapt.extra_loss``, e.g. SORSA's
   orthonormal regulariser), is added once per step.
3. The global gradient norm is clipped to ``max_grad_norm``; the optimiser (``config.optimizer``,
   AdamW by default, :mod:`.optimizers`; over the trainable parameters only) steps at the
   warmup-cosine learning rate (:mod:`.schedule`) (:func:`optimizer_step`).
4. The method's ``after_step`` hook runs with the number of optimiser steps done so far (1 after
   the first step).
5. Every ``eval_every`` steps and after the last one the task evaluates on held-out data
   (perplexity or accuracy); every ``save_every`` steps a checkpoint is written (:mod:`.state`).

The loop never looks at the method's name: everything method-specific is in the hooks. With
``adapter=None`` every parameter trains (full fine-tuning, the reference row). Resuming from the
latest checkpoint restores weights, optimizer, scheduler, RNG states and data position, so the
run continues exactly as if it had not stopped. The history (per step: loss, lr, gradient norm,
seconds, peak RSS, evaluations) is returned and written to ``OUT/history.json`` with the result.
"""
from __future__ import annotations

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
from slimtune.io.atomic import check_replaceable, is_ours
from slimtune.progress import note, progress_bar
from slimtune.train import state as files
from slimtune.train.config import TrainConfig
from slimtune.train.optimizers import build as build_optimizer
from slimtune.train.schedule import warmup_cosine


def accumulate_gradients(model: nn.Module, task, micro_batches: list) -> float:
    """Backpropagate the mean of the micro-batches' losses; return that mean (a float)."""
    total = 0.0
    for batch in micro_batches:
        loss = task.loss(model, batch)
        (loss / len(micro_batches)).backward()
        total += loss.item()
    return total / len(micro_batches)


def step_gradients(model: nn.Module, task, batches: list, with_adapter: bool
                   ) -> tuple[float, float | None]:
    """The step's gradients: the micro-batches' mean loss and the adapter's extra loss (if its
    method has one), backpropagated; ``(loss, extra loss or None)``."""
    loss = accumulate_gradients(model, task, batches)
    extra = adapt.extra_loss(model) if with_adapter else None
    if extra is not None:
        extra.backward()
        return loss, extra.item()
    return loss, None


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


def check_calibration(config: TrainConfig, adapter: AdapterConfig | None) -> None:
    """``calib_data`` is only for data-driven adapter methods (it would silently do nothing)."""
    if config.calib_data is not None and (
            adapter is None or not adapt.needs_calibration(adapter.method)):
        what = "full fine-tuning" if adapter is None else adapter.method
        raise ValueError(f"calib_data={config.calib_data!r}: {what} uses no calibration data")


def check_resume(out: str | os.PathLike, config: TrainConfig, adapter: AdapterConfig | None,
                 resume: bool, overwrite: bool = False) -> Path | None:
    """Check ``out`` for a run with these settings (cheap: reads no weights); return the
    checkpoint to resume from, or None to start afresh.

    Without ``resume`` or ``overwrite`` a non-empty ``out`` is a ``FileExistsError``. With
    ``overwrite`` the run starts afresh, and ``out`` must be a directory slimtune wrote
    (``NotOurDirectoryError`` otherwise). With ``resume``: ``ValueError`` for a finished run, for
    a directory that holds files but neither a checkpoint nor slimtune's marker (another
    program's files: never trained into, never replaced), or for a checkpoint whose settings
    (other than eval_every / save_every) or adapter differ."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} exists and is not a directory")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    if overwrite:
        check_replaceable(out, overwrite=True)
        return None
    if not resume:
        if out.is_dir() and any(out.iterdir()):
            raise FileExistsError(f"out {out} already exists (resume=True continues its run, "
                                  "overwrite=True replaces it)")
        return None
    checkpoint = files.latest_checkpoint(out)  # (a finished run keeps none: its last write
    if checkpoint is None and files.is_finished(out):  # replaced them all)
        raise ValueError(f"out {out} holds a finished run: nothing to resume")
    if checkpoint is None:
        if out.is_dir() and any(out.iterdir()) and not is_ours(out):
            raise ValueError(f"out {out} holds files but no slimtune checkpoint to resume from; "
                             "refusing to train into it (choose another output directory)")
        return None
    saved = files.read_run(checkpoint)
    changed = config.resume_mismatch(saved["config"])
    if changed:
        raise ValueError(f"{checkpoint}: cannot resume with different settings: {', '.join(changed)}")
    now = None if adapter is None else adapter.model_dump(mode="json")
    if saved["adapter"] != now:
        raise ValueError(f"{checkpoint}: cannot resume with a different adapter "
                         f"(saved {saved['adapter']}, given {now})")
    return checkpoint


def _setup_model(model: nn.Module, task, config: TrainConfig, adapter: AdapterConfig | None,
                 checkpoint: Path | None, progress: bool) -> nn.Module:
    """The task's model with the adapter applied (or restored) and only its parameters trainable."""
    if adapter is None and files.has_adapter(model):
        raise ValueError("the model already carries an adapter: pass adapter=<config> and a plain "
                         "base model (train applies it), or merge it first")
    model = task.prepare_model(model, seed=config.seed)
    if checkpoint is not None:
        return files.restore_weights(model, checkpoint, adapter is not None)
    if adapter is None:
        return model.requires_grad_(True)
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
    return model


def _new_history(model: nn.Module, config: TrainConfig, adapter: AdapterConfig | None,
                 params: list[nn.Parameter]) -> dict:
    hf_config = getattr(model, "config", None)
    effective = {**config.model_dump(mode="json"), "seqlen": config.window}
    if adapter is not None and adapt.needs_calibration(adapter.method):
        effective["calib_data"] = config.calib_data or config.data
    return {"model": getattr(hf_config, "_name_or_path", None),
            "mode": "full" if adapter is None else "adapter",
            "config": effective,
            "adapter": None if adapter is None else adapter.model_dump(mode="json"),
            "trainable_parameters": sum(p.numel() for p in params),
            "parameters": sum(p.numel() for p in model.parameters()),
            "torch_threads": torch.get_num_threads(), "resumed_at": [], "steps": []}


def train(model: nn.Module, task, config: TrainConfig, out: str | os.PathLike,
          adapter: AdapterConfig | None = None, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> tuple[nn.Module, dict]:
    """Fine-tune ``model`` on ``task`` (see the module docstring); return ``(trained model,
    history)``.

    ``model`` is a plain base model; it is modified in place (the adapter is applied to it, or
    restored on it from the checkpoint when resuming, or all its parameters are unfrozen). The
    returned model is the task's model around it (a classifier wraps an encoder). ``out`` must not
    hold files unless ``resume`` or ``overwrite`` (see :func:`check_resume`); with ``resume`` and
    no checkpoint yet, training starts afresh.
    """
    check_calibration(config, adapter)
    checkpoint = check_resume(out, config, adapter, resume, overwrite)
    saved = files.read_state(checkpoint) if checkpoint is not None else None
    files.claim(out, fresh=checkpoint is None)
    if resume and checkpoint is None:
        note(f"{out}: no checkpoint to resume from yet; starting at step 0")
    model = _setup_model(model, task, config, adapter, checkpoint, progress)
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
        files.set_rng_state(saved["rng"])
        history, start = saved["history"], saved["step"]
        history["resumed_at"].append(start)
        note(f"resumed from step {start} of {config.steps} ({checkpoint})")
    else:
        torch.manual_seed(config.seed)
        history, start = _new_history(model, config, adapter, params), 0

    model.train()
    bar, bar_task = progress_bar(config.steps, "train", progress)
    bar.update(bar_task, completed=start)
    with bar:
        for step in range(start, config.steps):
            began = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            batches = [task.next_batch(config.batch) for _ in range(config.grad_accum)]
            loss, extra = step_gradients(model, task, batches, with_adapter)
            if not math.isfinite(loss):
                raise FloatingPointError(f"step {step + 1}: the loss is {loss} (try a lower lr)")
            record = {"step": step + 1, "loss": loss, "lr": lr}
            if extra is not None:
                record["extra_loss"] = extra
            record["grad_norm"] = optimizer_step(
                params, optimizer, scheduler, config.max_grad_norm,
                lambda: step_gradients(model, task, batches, with_adapter)[0])
            if with_adapter:
                adapt.after_step(model, step + 1)
            record["seconds"] = time.perf_counter() - began
            record["peak_rss_mb"] = peak_rss_mb()
            done = step + 1
            if done == config.steps or (config.eval_every and done % config.eval_every == 0):
                record["eval"] = task.evaluate(model)
            history["steps"].append(record)
            tokens = config.batch * config.grad_accum * config.window  # at most (padding)
            bar.update(bar_task, advance=1, description=f"train loss {loss:.4f} lr {lr:.2e} "
                       f"{tokens / record['seconds']:.0f} tokens/s")
            if config.save_every and done % config.save_every == 0 and done < config.steps:
                files.write_checkpoint(out, done, model, {
                    "step": done, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "data": task.state_dict(),
                    "rng": files.rng_state(), "history": history},
                    run={"config": config.model_dump(mode="json"), "adapter": history["adapter"]})

    seconds = [r["seconds"] for r in history["steps"]]
    history.update(finished=True, final_eval=history["steps"][-1].get("eval"),
                   seconds_per_step=statistics.median(seconds), peak_rss_mb=peak_rss_mb())
    files.write_final(out, model, task.tokenizer, history)
    return model, history
