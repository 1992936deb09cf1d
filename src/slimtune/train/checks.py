"""Checks of a training run made before anything loads: calibration data only for data-driven
methods, optimiser and hooks compatible with the adapter method, the output directory (resume
or start afresh, same settings)."""
from __future__ import annotations

import os
from pathlib import Path

from slimtune import adapt
from slimtune.adapt.registry import AdapterConfig
from slimtune.io.atomic import check_replaceable, is_ours
from slimtune.train import state as files
from slimtune.train.config import TrainConfig
from slimtune.train.hooks import make_hooks
from slimtune.train.optimizers import OPTIMIZERS


def check_calibration(config: TrainConfig, adapter: AdapterConfig | None) -> None:
    """``calib_data`` is only for data-driven adapter methods (it would silently do nothing)."""
    if config.calib_data is not None and (
            adapter is None or not adapt.needs_calibration(adapter.method)):
        what = "full fine-tuning" if adapter is None else adapter.method
        raise ValueError(f"calib_data={config.calib_data!r}: {what} uses no calibration data")


def check_compatibility(config: TrainConfig, adapter: AdapterConfig | None) -> None:
    """The optimiser and every training hook can train with this adapter method (or in full):
    a ``ValueError`` saying which cannot and why, before anything loads; and the adapter
    method's schedule fits the run's ``steps``."""
    if adapter is not None:
        check_run = adapt.get_method(adapter.method).hook("check_run")
        if check_run is not None:
            check_run(adapter, config.steps)
    optimizer = OPTIMIZERS.make_config(config.optimizer, "optimizer", **config.optimizer_keys())
    checks = [(f"optimizer {config.optimizer}", OPTIMIZERS.get(config.optimizer), optimizer)]
    checks += [(f"hook {entry.name}", entry, hook) for entry, hook in make_hooks(config.hooks)]
    for what, entry, method_config in checks:
        conflict = entry.hook("conflict")
        reason = conflict(method_config, adapter) if conflict is not None else None
        if reason:
            raise ValueError(f"{what}: {reason}")


def check_resume(out: str | os.PathLike, config: TrainConfig, adapter: AdapterConfig | None,
                 resume: bool, overwrite: bool = False, meta: dict | None = None) -> Path | None:
    """Check ``out`` for a run with these settings (cheap: reads no weights); return the
    checkpoint to resume from, or None to start afresh.

    Without ``resume`` or ``overwrite`` a non-empty ``out`` is a ``FileExistsError``. With
    ``overwrite`` the run starts afresh, and ``out`` must be a directory slimtune wrote
    (``NotOurDirectoryError`` otherwise). With ``resume``: ``ValueError`` for a finished run, for
    a directory that holds files but neither a checkpoint nor slimtune's marker (another
    program's files: never trained into, never replaced), or for a checkpoint whose settings
    (other than eval_every / save_every), adapter or ``meta`` (the world size, a pretrained
    model's architecture; ``{"world_size": 1}`` by default) differ."""
    meta = {"world_size": 1} if meta is None else meta
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
    before = saved.get("meta", {"world_size": 1})
    if before != meta:
        changed = ", ".join(f"{k} {before.get(k)} -> {meta.get(k)}" for k in sorted(
            set(before) | set(meta)) if before.get(k) != meta.get(k))
        raise ValueError(f"{checkpoint}: cannot resume with different run settings: {changed} "
                         "(the data order and the model depend on them)")
    return checkpoint
