"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence").

For a fine-tuned weight ``W_t`` and its pre-trained ``W_0`` (``[out, in]``), with left singular
vectors ``y_j`` of ``W_t`` and ``x_i`` of ``W_0`` (all ``min(out, in)`` of them), a top-``k``
singular vector ``y_j`` (``j <= k``, by singular value) is an *intruder dimension* when

    max_i |cos(y_j, x_i)| < ε,

i.e. no pre-trained singular vector resembles it. The paper reports that LoRA-trained weights have
such new high-ranking singular vectors while fully fine-tuned ones (almost) do not, even at equal
task accuracy; that the intruders carry the forgetting of the pre-training distribution (scaling
their singular values down recovers it at a small task cost); and that they become fewer as the
(rank-stabilised) LoRA rank grows. Counts are per linear layer and summed per model.

Defaults ``k = 10`` and ``ε = 0.5``: those of PEFT's ``reduce_intruder_dimension`` (``top_k=10,
threshold_epsilon=0.5``), which implements the paper's definition exactly as above (left singular
vectors, absolute cosine, max over every pre-trained vector). The paper itself sweeps ``ε``; the
best match of every top-``k`` vector is kept in the reports, so any other threshold can be
counted afterwards (:func:`count_below`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from slimtune.io.atomic import atomic_file
from slimtune.weights.subspaces import max_abs_cosines, thin_svd

DEFAULT_K = 10
DEFAULT_EPSILON = 0.5


def check_settings(k: int, epsilon: float) -> None:
    """``ValueError`` unless ``k >= 1`` and ``0 < epsilon <= 1``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not 0 < epsilon <= 1:
        raise ValueError(f"epsilon must be in (0, 1], got {epsilon!r}")


def left_singular_vectors(W: torch.Tensor) -> torch.Tensor:
    """All ``min(out, in)`` left singular vectors of ``W`` as columns, descending by singular
    value (float32, or float64 for a float64 ``W``; CPU)."""
    A = W.detach().cpu()
    A = A if A.dtype == torch.float64 else A.to(torch.float32)
    return thin_svd(A)[0]


def best_matches(U_tuned: torch.Tensor, U_base: torch.Tensor) -> torch.Tensor:
    """``max_i |cos(y_j, x_i)|`` for each column ``y_j`` of ``U_tuned`` (the tuned weight's top-k
    left singular vectors) over all columns ``x_i`` of ``U_base``. Float64 ``[k]``."""
    return max_abs_cosines(U_tuned, U_base)


def count_below(matches, epsilon: float = DEFAULT_EPSILON) -> int:
    """How many best matches are below ``epsilon``: the intruder dimensions."""
    return int(sum(1 for m in matches if float(m) < epsilon))


def intruder_dimensions(W_tuned: torch.Tensor, W_base: torch.Tensor, k: int = DEFAULT_K,
                        epsilon: float = DEFAULT_EPSILON) -> dict:
    """``{"count", "indices", "best_match"}`` for one weight pair: which of ``W_tuned``'s top-``k``
    left singular vectors (0-based, descending singular value) are intruders, and every top-``k``
    vector's best match. ``k`` is capped at ``min(out, in)``."""
    check_settings(k, epsilon)
    if W_tuned.shape != W_base.shape or W_tuned.ndim != 2:
        raise ValueError(f"weights must be 2-D of one shape, got {tuple(W_tuned.shape)} and "
                         f"{tuple(W_base.shape)}")
    U_tuned = left_singular_vectors(W_tuned)[:, :min(k, min(W_tuned.shape))]
    matches = best_matches(U_tuned, left_singular_vectors(W_base))
    indices = [j for j, m in enumerate(matches.tolist()) if m < epsilon]
    return {"count": len(indices), "indices": indices,
            "best_match": [round(m, 6) for m in matches.tolist()]}


def per_block(rows: list[dict]) -> dict[int, int]:
    """``{depth: intruders summed over that block's layers}`` (layers outside blocks skipped)."""
    totals: dict[int, int] = {}
    for row in rows:
        if row.get("depth") is not None:
            totals[row["depth"]] = totals.get(row["depth"], 0) + int(row.get("intruders") or 0)
    return dict(sorted(totals.items()))


def plot_intruders(rows_by_model: dict[str, list[dict]], path: str | os.PathLike, k: int,
                   epsilon: float, title: str | None = None) -> Path:
    """PNG of intruder dimensions per block (summed over its linear layers) against depth, one
    line per model, and per layer type (summed over blocks) as grouped bars. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows_by_model:
        raise ValueError("no models to plot")
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    by_depth, by_type = fig.subplots(1, 2, width_ratios=[3, 2])
    colours = model_colours(len(rows_by_model))
    types = list(dict.fromkeys(row["type"] for rows in rows_by_model.values() for row in rows))
    width = 0.8 / len(rows_by_model)
    for m, ((label, rows), colour) in enumerate(zip(rows_by_model.items(), colours)):
        blocks = per_block(rows)
        if blocks:
            by_depth.plot(list(blocks), list(blocks.values()), marker="o", markersize=3,
                          color=colour, label=f"{label} ({sum(blocks.values())})")
        counts = [sum(int(r.get("intruders") or 0) for r in rows if r["type"] == t) for t in types]
        by_type.bar([i + (m - (len(rows_by_model) - 1) / 2) * width for i in range(len(types))],
                    counts, width=width, color=colour, label=label)
    from matplotlib.ticker import MaxNLocator

    for ax in (by_depth, by_type):
        ax.set_ylim(bottom=0, top=max(1.0, ax.get_ylim()[1]))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    by_depth.set_xlabel("block (depth)")
    by_depth.set_ylabel(f"intruders in the block (top-{k}, ε={epsilon:g})")
    by_depth.grid(True, alpha=0.3)
    by_depth.legend(fontsize=8)
    by_type.set_xticks(range(len(types)))
    by_type.set_xticklabels(types, rotation=45, ha="right", fontsize=8)
    by_type.set_ylabel("intruders over all blocks")
    by_type.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title or f"intruder dimensions: top-{k} singular vectors with max |cos| < "
                          f"{epsilon:g} to every base singular vector")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)


def model_colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]

