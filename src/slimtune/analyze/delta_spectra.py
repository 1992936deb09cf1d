"""Spectra of weight updates ``ΔW = W_t - W_0``: how low-rank is what fine-tuning changed?

Per linear layer: the singular values of ``ΔW``, its effective rank (spectral entropy, Roy &
Vetterli 2007), stable rank ``||ΔW||_F² / ||ΔW||_2²`` and the fraction of ``||ΔW||_F²`` kept at
ranks 8/32/128 (:mod:`slimtune.weights.svd`), plus ``||ΔW||_F`` and ``||ΔW||_F / ||W_0||_F``. A
rank-``r`` LoRA update has at most ``r`` non-zero singular values (effective rank ``<= r``); full
fine-tuning's updates are usually full rank with a heavy head, which is the contrast
Shuttleworth et al. (2024) draw (see :mod:`slimtune.analyze.intruders`).
:func:`plot_delta_spectra` draws the normalised spectra ``σ_i / σ_1`` of every changed layer, one
subplot per layer type and one colour per model, in the style of
:func:`slimtune.analyze.spectra.plot_spectra`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from slimtune.analyze.spectra import ENERGY_RANKS, format_spectrum_axis
from slimtune.io.atomic import atomic_file
from slimtune.weights.svd import effective_rank, energy_kept, stable_rank


def spectrum_summary(S: torch.Tensor) -> dict:
    """``stable_rank``, ``effective_rank`` and ``energy_r8``/``energy_r32``/``energy_r128`` of a
    descending spectrum ``S`` (all zero: ranks 0, energies None)."""
    if not bool((S > 0).any()):
        return {"stable_rank": 0.0, "effective_rank": 0.0,
                **{f"energy_r{r}": None for r in ENERGY_RANKS}}
    return {"stable_rank": stable_rank(S), "effective_rank": effective_rank(S),
            **{f"energy_r{r}": energy_kept(S, r) for r in ENERGY_RANKS}}


def delta_spectrum(W_tuned: torch.Tensor, W_base: torch.Tensor) -> dict:
    """``{"singular_values", "delta_norm", "relative_change", **spectrum_summary}`` of
    ``ΔW = W_tuned - W_base`` (float32 SVD on the CPU; float64 inputs stay float64)."""
    if W_tuned.shape != W_base.shape or W_tuned.ndim != 2:
        raise ValueError(f"weights must be 2-D of one shape, got {tuple(W_tuned.shape)} and "
                         f"{tuple(W_base.shape)}")
    dtype = torch.float64 if torch.float64 in (W_tuned.dtype, W_base.dtype) else torch.float32
    base = W_base.detach().cpu().to(dtype)
    delta = W_tuned.detach().cpu().to(dtype) - base
    S = torch.linalg.svdvals(delta)
    return {"singular_values": S, **norms(delta, base), **spectrum_summary(S)}


def norms(delta: torch.Tensor, base: torch.Tensor) -> dict:
    """``{"delta_norm": ||ΔW||_F, "relative_change": ||ΔW||_F / ||W_0||_F}`` (floats)."""
    d, b = float(torch.linalg.norm(delta.double())), float(torch.linalg.norm(base.double()))
    return {"delta_norm": d, "relative_change": d / b if b > 0 else math.inf if d > 0 else 0.0}


def plot_delta_spectra(rows_by_model: dict[str, list[dict]], path: str | os.PathLike,
                       title: str | None = None) -> Path:
    """PNG of ``σ_i(ΔW) / σ_1(ΔW)`` (log y) per layer type, one colour per model, one thin line
    per changed layer (rows need ``type``, ``shape`` and ``singular_values``; a row whose
    ``singular_values`` is None or all zero is skipped). Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from slimtune.analyze.intruders import model_colours

    rows_all = [row for rows in rows_by_model.values() for row in rows]
    if not rows_all:
        raise ValueError("no rows to plot")
    types = list(dict.fromkeys(row["type"] for row in rows_all))
    n_cols = min(4, len(types))
    n_rows = math.ceil(len(types) / n_cols)
    fig = Figure(figsize=(4 * n_cols, 3.2 * n_rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    colours = dict(zip(rows_by_model, model_colours(len(rows_by_model))))
    for ax, layer_type in zip(axes, types):
        for label, rows in rows_by_model.items():
            for row in (r for r in rows if r["type"] == layer_type):
                S = row.get("singular_values")
                if S is None or not S.numel() or float(S[0]) <= 0:
                    continue
                S = S.to(torch.float64)
                ratio = (S / S[0]).clamp_min(1e-12).numpy()
                ax.plot(range(1, len(ratio) + 1), ratio, color=colours[label], linewidth=0.6,
                        alpha=0.5)
        shape = next(r["shape"] for r in rows_all if r["type"] == layer_type)
        format_spectrum_axis(ax, f"ΔW {layer_type} {shape[0]}×{shape[1]}")
    for ax in axes[len(types):]:
        ax.set_visible(False)
    fig.legend(handles=[Line2D([], [], color=c, label=label) for label, c in colours.items()],
               loc="outside lower center", ncols=min(len(colours), 6), fontsize=8)
    fig.suptitle(title or "spectra of the updates ΔW = W_t − W_0 (one line per layer)")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)
