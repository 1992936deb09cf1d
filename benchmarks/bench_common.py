"""Helpers shared by the benchmark scripts: cutting a model to its first blocks (smoke tests),
timing models in alternating rounds, the JSON-lines result files (one row per run, appended;
read back for ``--table``), and what a result records of where it ran (commit, CPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def first_blocks(model, n: int):
    """``model`` cut to its first ``n`` transformer blocks (in place; smoke tests)."""
    from slimtune.calib import find_blocks

    path, blocks = find_blocks(model)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, blocks[:n])
    model.config.num_hidden_layers = n
    return model


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def alternate(names: list[str], warmup: int, steps: int,
              run: Callable[[str, int], tuple[float, float]]) -> tuple[dict, dict]:
    """Call ``run(name, round)`` -> ``(seconds, loss)`` for every name in every one of
    ``warmup + steps`` rounds (round numbers from 1), the order rotated by one each round so that
    none is always first; print each round to stderr. Returns ``(times, first_loss)``: the
    seconds of the timed rounds and the loss of the first round, per name."""
    times = {n: [] for n in names}
    first_loss, last = {}, {}
    for rnd in range(warmup + steps):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            seconds, loss = run(name, rnd + 1)
            first_loss.setdefault(name, loss)
            last[name] = seconds
            if rnd >= warmup:
                times[name].append(seconds)
        print(f"round {rnd + 1}{' (warm-up)' if rnd < warmup else ''}: "
              + ", ".join(f"{n} {last[n]:.2f} s" for n in names), file=sys.stderr, flush=True)
    return times, first_loss


def git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "--short", "HEAD") + (
            "-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name (timings are comparable only on one machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
