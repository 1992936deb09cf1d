"""Sparsity patterns, pruning masks and the saliency scores of magnitude pruning and Wanda.

A mask is a bool tensor shaped like the weight ``W [out, in]``; True = kept. Patterns are
``"unstructured"`` or ``"N:M"``: N kept of every M consecutive inputs of each row (2:4 is the
pattern of NVIDIA's sparse tensor cores). Masks prune the lowest scores; ties break
deterministically by a stable sort: among equal scores the earlier column is kept. The number
pruned out of ``k`` entries is ``floor(sparsity · k)`` (:func:`prune_count`).

Scores: magnitude ``|W_ij|``; Wanda (Sun et al., 2023) ``|W_ij| · ||X_j||₂``, with ``||X_j||₂``
the L2 norm of input ``j`` over the calibration tokens (``sqrt(diag(XᵀX))``), compared per row.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from slimtune.weights.precision import compute_dtype

_PATTERN_HELP = ("a sparsity pattern is 'unstructured' or 'N:M' (keep N of every M consecutive "
                 "inputs, 0 < N < M, e.g. '2:4')")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """``"unstructured"`` -> None, ``"N:M"`` -> ``(N, M)``; ValueError otherwise."""
    if not isinstance(pattern, str):
        raise ValueError(f"{_PATTERN_HELP}; got {pattern!r}")
    text = pattern.strip().lower()
    if text == "unstructured":
        return None
    parts = [p.strip() for p in text.split(":")]
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError(f"{_PATTERN_HELP}; got {pattern!r}")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise ValueError(f"{_PATTERN_HELP}; {pattern!r} keeps N={n} of M={m}")
    return n, m


def prune_count(sparsity: float, total: int) -> int:
    """``floor(sparsity · total)`` (with a 1e-9 guard against round-off), for 0 <= sparsity <= 1."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
            0 <= sparsity <= 1):
        raise ValueError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    return min(total, math.floor(sparsity * total + 1e-9))


def _keep_top(scores: Tensor, keep: int) -> Tensor:
    """Mask keeping the ``keep`` highest of every row of a 2-D ``scores`` (stable)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter_(1, order[:, :keep], True)


def _matrix(scores: Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"expected 2-D scores [out, in], got shape {tuple(scores.shape)}")


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive columns in each row."""
    _matrix(scores)
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    out, cols = scores.shape
    if cols % m:
        raise ValueError(f"M={m} does not divide the {cols} inputs")
    return _keep_top(scores.reshape(-1, m), n).reshape(out, cols)


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune the lowest ``floor(sparsity · in)`` scores of every row."""
    _matrix(scores)
    return _keep_top(scores, scores.shape[1] - prune_count(sparsity, scores.shape[1]))


def prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Prune exactly the ``k`` lowest scores over the whole tensor (ties as the stable sort: the
    later entries in row-major order go first). By selection, not by sorting: the ``k``-th
    lowest ``t`` is found in linear time, every score below ``t`` is pruned and the last of the
    scores equal to ``t`` make up the count."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"cannot prune {k} of {scores.numel()} entries")
    flat = scores.reshape(-1)
    mask = torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
    if k:
        t = torch.kthvalue(flat, k).values
        mask[flat < t] = False
        ties = torch.nonzero(flat == t).squeeze(1)
        mask[ties[len(ties) - (k - int((~mask).sum())):]] = False
    return mask.reshape(scores.shape)


def layer_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune the lowest ``floor(sparsity · numel)`` scores over the whole matrix."""
    _matrix(scores)
    return prune_lowest(scores, prune_count(sparsity, scores.numel()))


def magnitude_scores(W: Tensor) -> Tensor:
    return W.detach().to(compute_dtype(W)).abs()


def wanda_scores(W: Tensor, col_norms: Tensor) -> Tensor:
    """``|W_ij| · ||X_j||₂`` with ``col_norms [in]`` the per-input L2 norms over the tokens."""
    _matrix(W)
    if col_norms.shape != (W.shape[1],):
        raise ValueError(f"col_norms must have shape ({W.shape[1]},), got "
                         f"{tuple(col_norms.shape)}")
    dtype = compute_dtype(W, col_norms)
    norms = col_norms.detach().to(device=W.device, dtype=dtype)
    return W.detach().to(dtype).abs() * norms[None, :]
