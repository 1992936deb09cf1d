"""Subspace alignment: principal angles between two weights' top-``k`` singular subspaces.

For two weights of one layer, the top-``k`` left (output-space, ``U_k``) and right (input-space,
``V_k``) singular subspaces are compared by their principal angles ``θ_i`` (``cos θ_i`` = the
singular values of ``U1_kᵀ U2_k``, Björck & Golub 1973) and summarised as the normalised subspace
similarity ``Σ cos² θ_i / k`` in ``[0, 1]`` (Hu et al. 2021, the LoRA paper's ``φ``), whose chance
level for random subspaces of ``R^d`` is ``k / d`` (:mod:`slimtune.weights.subspaces`).

``slimtune compare`` uses it two ways, per linear layer, then averaged over the layers:

- each model's update ``ΔW`` against the base weight ``W_0``: does fine-tuning act in the
  directions the pre-trained weight already uses most, or in new ones (cf.
  :mod:`slimtune.analyze.intruders`)?
- the updates of two models against each other: do two fine-tunes change the same directions
  (what a task-vector merge of them has to reconcile)?

An update's subspace has at most its numerical rank (singular values above ``RANK_TOL`` times
the largest) dimensions: a rank-4 LoRA update is compared through its 4 directions, not through
float rounding noise. Similarities of subspaces of different sizes divide by the smaller one.

:func:`alignment_matrix` builds the model-by-model table (the base ``W_0`` as the first row and
column) and :func:`plot_alignment` draws it as heat maps, left and right side by side.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from slimtune.io.atomic import atomic_file
from slimtune.weights.subspaces import angles_in_degrees, principal_angles, subspace_similarity

DEFAULT_K = 16
RANK_TOL = 1e-3  # an update's subspace keeps only singular values above this times its largest
BASE_LABEL = "base W₀"
Subspaces = tuple[torch.Tensor, torch.Tensor]  # (U_k [out, k], V_k [in, k])


def layer_alignment(a: Subspaces, b: Subspaces, angles: bool = False) -> dict:
    """``{"left", "right"}`` subspace similarities of two ``(U_k, V_k)`` pairs of one layer, and
    with ``angles`` also ``"left_angles"``/``"right_angles"`` (principal angles in degrees)."""
    out = {"left": subspace_similarity(a[0], b[0]), "right": subspace_similarity(a[1], b[1])}
    if angles:
        out["left_angles"] = angles_in_degrees(principal_angles(a[0], b[0]))
        out["right_angles"] = angles_in_degrees(principal_angles(a[1], b[1]))
    return out


def mean_alignment(a: dict[str, Subspaces | None], b: dict[str, Subspaces | None]) -> dict:
    """``{"left", "right", "layers"}``: mean similarity over the layers both sides have (a layer
    whose update is zero has None), or None values when they share none."""
    shared = [n for n in a if a[n] is not None and b.get(n) is not None]
    if not shared:
        return {"left": None, "right": None, "layers": 0}
    sims = [layer_alignment(a[n], b[n]) for n in shared]
    return {"left": sum(s["left"] for s in sims) / len(sims),
            "right": sum(s["right"] for s in sims) / len(sims), "layers": len(shared)}


def alignment_matrix(base: dict[str, Subspaces], updates: dict[str, dict[str, Subspaces | None]]
                     ) -> dict:
    """``{"labels", "left", "right", "layers"}``: square tables over ``[BASE_LABEL, *models]`` of
    the mean layer similarity: (base, model) compares the model's ``ΔW`` with ``W_0``, (model,
    model') the two updates; the diagonal is 1 (where a side has any changed layer)."""
    sides: dict[str, dict[str, Subspaces | None]] = {BASE_LABEL: dict(base), **updates}
    labels = list(sides)
    n = len(labels)
    table = {"left": [[None] * n for _ in range(n)], "right": [[None] * n for _ in range(n)],
             "layers": [[0] * n for _ in range(n)]}
    for i in range(n):
        for j in range(i, n):
            result = mean_alignment(sides[labels[i]], sides[labels[j]])
            for key in ("left", "right", "layers"):
                table[key][i][j] = table[key][j][i] = result[key]
    return {"labels": labels, **table}


def plot_alignment(matrix: dict, path: str | os.PathLike, k: int, title: str | None = None) -> Path:
    """Heat maps of :func:`alignment_matrix`'s left and right tables (values written in the
    cells; missing ones grey). Written atomically; returns the path."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = matrix["labels"]
    n = len(labels)
    size = 1.2 + 0.7 * n
    fig = Figure(figsize=(2 * size + 1.5, size + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    image = None
    for ax, side in zip(axes, ("left", "right")):
        values = np.array([[np.nan if v is None else v for v in row] for row in matrix[side]],
                          dtype=float)
        image = ax.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticklabels(labels, fontsize=8)
        for i in range(n):
            for j in range(n):
                if not np.isnan(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if values[i, j] < 0.6 else "black")
        where = "output space (U)" if side == "left" else "input space (V)"
        ax.set_title(f"{side}: {where}", fontsize=9)
    fig.colorbar(image, ax=list(axes), label=f"Σcos²θ / {k} (mean over layers)", shrink=0.8)
    fig.suptitle(title or f"alignment of top-{k} singular subspaces: ΔW of each model vs W₀ and "
                          "vs each other")
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return Path(path)
