"""Task singular vectors (Gargiulo et al. 2025): the per-task low-rank SVD factors of a layer's task
matrices, concatenated and decorrelated. Pure tensor functions on the inputs' own device; the SVDs
run in the inputs' dtype (give float32 or float64).

- :func:`polar_factor`: the orthogonal polar factor ``P Qᵀ`` of ``A = P Σ Qᵀ`` (the nearest matrix
  with orthonormal columns, or rows when ``A`` is wide).
- :func:`task_singular_vectors`: each task's top-``k`` singular triplets, concatenated as
  ``U = [U₁ … U_T]``, ``S = [Σ₁ … Σ_T]``, ``Vᵀ = [V₁ … V_T]ᵀ``.
- :func:`tsv_factors`: ``(U_⊥, S, V_⊥ᵀ)`` with ``U_⊥``, ``V_⊥ᵀ`` the polar factors of ``U``
  and ``Vᵀ``; TSV-Merge's merged task matrix is ``U_⊥ diag(S) V_⊥ᵀ``.
"""
from __future__ import annotations

import math

import torch


def polar_factor(A: torch.Tensor) -> torch.Tensor:
    """``P Qᵀ`` from the reduced SVD ``A = P Σ Qᵀ``: the matrix with orthonormal columns (rows, if
    ``A`` is wide) closest to ``A`` in Frobenius norm."""
    P, _, Qh = torch.linalg.svd(A, full_matrices=False)
    return P @ Qh


def kept_rank(shape: tuple[int, int], fraction: float) -> int:
    """``max(1, floor(min(m, n) · fraction))``: how many singular triplets each task keeps."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.floor(min(shape) * fraction))


def task_singular_vectors(stacked: torch.Tensor, k: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U [m, T·k], S [T·k], Vh [T·k, n])``: the top-``k`` singular triplets of each task matrix
    ``Δᵢ = Uᵢ Σᵢ Vᵢᵀ`` of ``stacked`` ``[T, m, n]``, concatenated task after task."""
    if stacked.dim() != 3:
        raise ValueError(f"expected task matrices [T, m, n], got shape {list(stacked.shape)}")
    factors = []
    for delta in stacked:  # one task at a time: only its top-k triplets are kept
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        factors.append((U[:, :k], S[:k], Vh[:k]))
    Us, Ss, Vhs = zip(*factors)
    return torch.cat(Us, dim=1), torch.cat(Ss), torch.cat(Vhs, dim=0)


def tsv_factors(stacked: torch.Tensor, fraction: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_⊥, S, V_⊥ᵀ)`` of TSV-Merge for task matrices ``stacked`` ``[T, m, n]``: each task keeps
    ``kept_rank((m, n), fraction)`` triplets; ``U_⊥ = polar(U)``, ``V_⊥ᵀ = polar(Vᵀ)``. When
    ``T·k ≤ min(m, n)``, ``U_⊥ᵀ U_⊥ = I`` and ``V_⊥ᵀ V_⊥ = I``."""
    U, S, Vh = task_singular_vectors(stacked, kept_rank(tuple(stacked.shape[1:]), fraction))
    return polar_factor(U), S, polar_factor(Vh)
