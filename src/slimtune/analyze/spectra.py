"""Singular-value spectra of a model's linear weights: how low-rank is each layer already?

:func:`layer_spectra` returns one row per selected linear weight (embeddings and the LM head are
never included) with its singular values and scalar summaries; :func:`plot_spectra` draws the
normalised spectra ``sigma_i / sigma_1`` per layer type, one line per block coloured by depth.

A layer's *type* is its name after the last block index (``model.layers.3.self_attn.q_proj`` ->
``self_attn.q_proj``, ``encoder.layer.0.attention.output.dense`` -> ``attention.output.dense``) and
its *depth* is that index; a linear outside the numbered blocks (BERT's ``pooler.dense``) is its own
type with depth ``None``. Factored layers (``FactoredLinear``, e.g. in a compressed model) are
analysed through their dense weight.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from slimtune.io.atomic import atomic_file
from slimtune.layers import FactoredLinear
from slimtune.targets import Targets, match_targets
from slimtune.progress import progress_bar
from slimtune.weights.svd import effective_rank, energy_kept, stable_rank

ENERGY_RANKS = (8, 32, 128)
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def layer_type_and_depth(name: str) -> tuple[str, int | None]:
    """``("self_attn.q_proj", 3)`` for ``"model.layers.3.self_attn.q_proj"``; ``(name, None)`` outside blocks."""
    matches = list(_BLOCK_INDEX.finditer(name))
    if not matches:
        return name, None
    last = matches[-1]
    return name[last.end():], int(last.group(1))


def _weight(module: nn.Module) -> torch.Tensor:
    return module.dense_weight() if isinstance(module, FactoredLinear) else module.weight


def layer_spectra(model: nn.Module, targets: Targets = "all-linear", progress: bool = True) -> list[dict]:
    """One row per selected linear weight, in model order.

    ``targets`` follows :func:`slimtune.targets.match_targets` (``"all-linear"``, a regex, or a list
    of name suffixes). Each row: ``name``, ``type``, ``depth``, ``shape`` ``[out, in]``,
    ``singular_values`` (float32 tensor from ``torch.linalg.svdvals``, descending),
    ``stable_rank``, ``effective_rank`` and ``energy_r8``/``energy_r32``/``energy_r128`` (fraction
    of squared Frobenius norm kept by the best rank-r approximation). Raises ``ValueError`` when
    nothing is selected.
    """
    selected = set(match_targets(model, targets, include_factored=True))
    modules = [(n, m) for n, m in model.named_modules() if n in selected]
    if not modules:
        raise ValueError(f"targets {targets!r} match no linear layer in {type(model).__name__}")
    rows = []
    bar, task = progress_bar(len(modules), "singular values", progress)
    # One thread: on these small matrices MKL's multi-threaded SVD gains little and, when another
    # process shares the cores, slows down badly (measured on 2 cores: 576x1536 took 0.6-13 s with
    # 2 threads vs 0.17-0.19 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with bar, torch.no_grad():
            for name, module in modules:
                rows.append(_spectrum_row(name, _weight(module)))
                bar.advance(task)
    finally:
        torch.set_num_threads(threads)
    return rows


def _spectrum_row(name: str, weight: torch.Tensor) -> dict:
    weight = weight.detach().to(torch.float32)
    S = torch.linalg.svdvals(weight)
    layer_type, depth = layer_type_and_depth(name)
    row = {"name": name, "type": layer_type, "depth": depth, "shape": list(weight.shape),
           "singular_values": S, "stable_rank": stable_rank(S), "effective_rank": effective_rank(S)}
    row.update({f"energy_r{r}": energy_kept(S, r) for r in ENERGY_RANKS})
    return row


def rows_as_json(rows: list[dict]) -> list[dict]:
    """The rows without their singular-value tensors (JSON-able)."""
    return [{k: v for k, v in row.items() if k != "singular_values"} for row in rows]


def write_spectra_json(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write the rows (without singular values) as a JSON list, atomically."""
    text = json.dumps(rows_as_json(rows), indent=1)
    with atomic_file(path) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)


def plot_spectra(rows: list[dict], path: str | os.PathLike, title: str | None = None) -> Path:
    """Save a PNG of ``sigma_i / sigma_1`` against ``i`` (log y), one subplot per layer type.

    Lines are coloured by depth (viridis, shallow = dark); layers without a depth are drawn black.
    Uses matplotlib's Agg canvas directly (no pyplot, no display). Written atomically; returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no rows to plot")
    types = list(dict.fromkeys(row["type"] for row in rows))
    depths = [row["depth"] for row in rows if row["depth"] is not None]
    norm = Normalize(vmin=min(depths, default=0), vmax=max(max(depths, default=1), 1))
    colours = ScalarMappable(norm=norm, cmap="viridis")

    n_cols = min(4, len(types))
    n_rows = math.ceil(len(types) / n_cols)
    fig = Figure(figsize=(4 * n_cols + 1, 3.2 * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, layer_type in zip(axes, types):
        for row in (r for r in rows if r["type"] == layer_type):
            S = row["singular_values"].to(torch.float64)
            top = float(S[0]) if S.numel() else 0.0
            if top <= 0:
                continue
            ratio = (S / top).clamp_min(1e-12).numpy()
            colour = "black" if row["depth"] is None else colours.to_rgba(row["depth"])
            ax.plot(range(1, len(ratio) + 1), ratio, color=colour, linewidth=0.8)
        shape = next(r["shape"] for r in rows if r["type"] == layer_type)
        format_spectrum_axis(ax, f"{layer_type} {shape[0]}×{shape[1]}")
    for ax in axes[len(types):]:
        ax.set_visible(False)
    if depths:
        fig.colorbar(colours, ax=list(axes[:len(types)]), label="layer depth", shrink=0.8)
    if title:
        fig.suptitle(title)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def format_spectrum_axis(ax, title: str) -> None:
    """Log-scale ``σ_i / σ_1`` against ``i``, titled, with a light grid."""
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1")
    ax.grid(True, which="major", alpha=0.3)
