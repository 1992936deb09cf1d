"""Files of a training run: checkpoints (for resuming) and the final result.

While training, the output directory ``OUT`` holds ``checkpoints/step-NNNNNNNN/``, each with

- the weights: ``adapter/`` (:func:`slimtune.adapt.save`: only the adapter and any module trained
  in full, never the base model) or, for full fine-tuning, ``weights.safetensors`` (every
  parameter);
- ``state.pt``: step, optimizer and scheduler state, RNG states (torch CPU/CUDA, Python
  ``random``), the task's data position, the history so far, the adapter method's training
  state (``slimtune.adapt.method_state``: importance averages and the like);
- ``run.json``: the step and the run's settings (training config, adapter config), small, so a
  resume can be checked before anything is loaded.

A checkpoint is built in a temporary directory and renamed into place, so a crash leaves either
the whole checkpoint or none; older checkpoints are deleted after the new one exists.

When the run ends, ``OUT`` is replaced (temp directory, then rename) by the final result: the
adapter (``adapter.json`` + ``adapter.safetensors``, readable by :func:`slimtune.adapt.load`) or,
for full fine-tuning, a Hugging Face model directory (``slimtune eval --model OUT`` reads it;
models without ``save_pretrained`` get ``model.safetensors``), plus ``history.json``. The
checkpoints go with the old directory.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from slimtune import adapt
from slimtune.io.atomic import atomic_dir, mark

CHECKPOINTS, STATE_FILE, RUN_FILE, ADAPTER_DIR = "checkpoints", "state.pt", "run.json", "adapter"
FULL_WEIGHTS, HISTORY_FILE = "weights.safetensors", "history.json"
_STEP_DIR = re.compile(r"step-(\d{8})")


def has_adapter(model: nn.Module) -> bool:
    return getattr(model, "slimtune_adapter", None) is not None


def checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out`` as ``(step, path)``, oldest first."""
    root = Path(out) / CHECKPOINTS
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _STEP_DIR.fullmatch(path.name)
            if match and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = checkpoints(out)
    return found[-1][1] if found else None


def is_finished(out: str | os.PathLike) -> bool:
    """``out`` holds a final result (its history says the run finished)."""
    path = Path(out) / HISTORY_FILE
    try:
        return bool(json.loads(path.read_text()).get("finished"))
    except (OSError, ValueError):
        return False


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_weights(model: nn.Module, directory: Path) -> None:
    if has_adapter(model):
        adapt.save(model, directory / ADAPTER_DIR)
    else:
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters()},
                  directory / FULL_WEIGHTS)


def claim(out: str | os.PathLike, fresh: bool) -> None:
    """Make ``out`` this run's directory (created, marked as slimtune's). A ``fresh`` run drops
    the checkpoints of an earlier run there; an earlier final result stays until this run's
    replaces it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fresh and (out / CHECKPOINTS).is_dir():
        shutil.rmtree(out / CHECKPOINTS)
    mark(out)


def write_checkpoint(out: str | os.PathLike, step: int, model: nn.Module, state: dict,
                     run: dict) -> Path:
    """Write checkpoint ``step`` (weights, ``state``, ``run``) atomically; delete older ones."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:08d}"
    with atomic_dir(target, overwrite=True) as tmp:
        _save_weights(model, tmp)
        torch.save(state, tmp / STATE_FILE)
        (tmp / RUN_FILE).write_text(json.dumps({"step": step, **run}, indent=1))
    for old_step, path in checkpoints(out):
        if old_step != step:
            shutil.rmtree(path, ignore_errors=True)
    return target


def read_run(checkpoint: Path) -> dict:
    return json.loads((checkpoint / RUN_FILE).read_text())


def read_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / STATE_FILE, weights_only=True)


def restore_weights(model: nn.Module, checkpoint: Path, with_adapter: bool) -> nn.Module:
    """Put the checkpoint's weights on ``model`` (a plain base model for an adapter run, which
    :func:`slimtune.adapt.load` adapts in place) and return it."""
    if with_adapter:
        return adapt.load(model, checkpoint / ADAPTER_DIR)
    from safetensors.torch import load_file

    saved = load_file(checkpoint / FULL_WEIGHTS)
    params = dict(model.named_parameters())
    if set(saved) != set(params):
        raise ValueError(f"{checkpoint}: saved parameters do not match the model (missing "
                         f"{sorted(set(params) - set(saved))[:4]}, unexpected "
                         f"{sorted(set(saved) - set(params))[:4]})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    return model


def write_final(out: str | os.PathLike, model: nn.Module, tokenizer, history: dict) -> Path:
    """Replace ``out`` by the final weights plus ``history.json`` (see the module docstring)."""
    out = Path(out)
    with atomic_dir(out, overwrite=True) as tmp:
        if has_adapter(model):
            adapt.save(model, tmp, overwrite=True)
        elif hasattr(model, "save_pretrained"):
            from slimtune.io.checkpoint import save_model

            save_model(model, tokenizer, tmp, overwrite=True)
        else:
            from safetensors.torch import save_file

            save_file({n: p.detach().contiguous().cpu() for n, p in model.named_parameters()},
                      tmp / "model.safetensors")
        (tmp / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    return out
