"""Helpers shared by the benchmark scripts: cutting a model to its first blocks (smoke tests) and
the JSON-lines result files (one row per run, appended; read back for ``--table``)."""
from __future__ import annotations

import json
from pathlib import Path


def first_blocks(model, n: int):
    """``model`` cut to its first ``n`` transformer blocks (in place; smoke tests)."""
    from slimtune.pipeline import find_blocks

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
