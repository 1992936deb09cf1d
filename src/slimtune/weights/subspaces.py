"""Comparing the singular subspaces of two weights: principal angles, subspace similarity and
best-match cosines of singular vectors.

A subspace is given by a matrix ``Q`` ``[d, k]`` with orthonormal columns (e.g. the top-``k`` left
singular vectors ``U_k`` of a weight, from :func:`top_singular_subspace`).

- :func:`principal_cosines` -- ``cos θ_1 >= ... >= cos θ_min(k1,k2)``, the singular values of
  ``Q1ᵀ Q2`` (Björck & Golub 1973, "Numerical methods for computing angles between linear
  subspaces"); :func:`principal_angles` the angles ``θ_i`` in radians, ascending.
- :func:`subspace_similarity` -- ``Σ cos² θ_i / min(k1, k2) = ||Q1ᵀ Q2||_F² / min(k1, k2)`` in
  ``[0, 1]``: 1 when one subspace contains the other, 0 when they are orthogonal, ``k/d`` in
  expectation for random ``k``-dim subspaces of ``R^d`` (``k1 = k2 = k``). This is the normalised
  subspace similarity of the LoRA paper (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
  Language Models", §7.2, ``φ(A, B, i, j)``).
- :func:`max_abs_cosines` -- for each column ``u_j`` of one orthonormal set, ``max_i |<u_j, x_i>|``
  over the columns ``x_i`` of another: the best match of each vector. Shuttleworth et al. (2024)
  call a top singular vector of a tuned weight whose best match among the base weight's singular
  vectors is below ``ε`` an *intruder dimension* (see :mod:`slimtune.analyze.intruders`).

Everything computes in float64 (cheap at these sizes) and returns CPU tensors or floats.
"""
from __future__ import annotations

import math

import torch

from slimtune.weights.svd import truncated_svd


def _orthonormal(Q: torch.Tensor, name: str) -> torch.Tensor:
    if Q.ndim != 2 or Q.shape[1] == 0 or Q.shape[1] > Q.shape[0]:
        raise ValueError(f"{name} must be [d, k] with 1 <= k <= d, got shape {tuple(Q.shape)}")
    return Q.detach().to(device="cpu", dtype=torch.float64)


def _pair(Q1: torch.Tensor, Q2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = _orthonormal(Q1, "Q1"), _orthonormal(Q2, "Q2")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"subspaces live in different spaces: R^{A.shape[0]} and R^{B.shape[0]}")
    return A, B


def thin_svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(A, full_matrices=False)``, computed on the transpose when ``A`` is wide
    (LAPACK is about twice as fast on a tall 1536x576 matrix as on its 576x1536 transpose)."""
    if A.shape[-2] < A.shape[-1]:
        U, S, Vh = torch.linalg.svd(A.mT, full_matrices=False)
        return Vh.mT, S, U.mT
    return torch.linalg.svd(A, full_matrices=False)


def top_singular_subspace(W: torch.Tensor, k: int, side: str = "left") -> torch.Tensor:
    """Orthonormal basis of the top-``k`` singular subspace of ``W`` ``[m, n]``: ``U_k`` ``[m, k]``
    (``side="left"``, the output space) or ``V_k`` ``[n, k]`` (``side="right"``, the input space),
    from the exact SVD (:func:`slimtune.weights.svd.truncated_svd`)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    U, _, Vh = truncated_svd(W, k)
    return U if side == "left" else Vh.mT


def principal_cosines(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between ``span(Q1)`` and ``span(Q2)``, descending, in
    ``[0, 1]`` (``min(k1, k2)`` of them; float64)."""
    A, B = _pair(Q1, Q2)
    return torch.linalg.svdvals(A.mT @ B).clamp(0.0, 1.0)


def principal_angles(Q1: torch.Tensor, Q2: torch.Tensor) -> torch.Tensor:
    """Principal angles ``θ_i = arccos(cos θ_i)`` in radians, ascending (float64)."""
    return torch.arccos(principal_cosines(Q1, Q2))


def subspace_similarity(Q1: torch.Tensor, Q2: torch.Tensor) -> float:
    """``Σ cos² θ_i / min(k1, k2)`` in ``[0, 1]`` (see the module docstring)."""
    A, B = _pair(Q1, Q2)
    return float((A.mT @ B).square().sum() / min(A.shape[1], B.shape[1]))


def max_abs_cosines(U: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``max_i |<u_j, x_i>|`` for every column ``u_j`` of ``U`` ``[d, k]`` over the columns
    ``x_i`` of ``X`` ``[d, r]`` (both with unit columns; absolute, since a singular vector's sign
    is arbitrary). Float64 ``[k]``, in ``[0, 1]``."""
    A, B = _pair(U, X)
    return (A.mT @ B).abs().amax(dim=1).clamp(0.0, 1.0)


def angles_in_degrees(theta: torch.Tensor) -> list[float]:
    """Principal angles in degrees, rounded to 0.01, as a plain list (for reports)."""
    return [round(float(t) * 180.0 / math.pi, 2) for t in theta]
