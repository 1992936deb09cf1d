"""Low-rank truncation of a weight during training and the nuclear norm's sub-gradient (TRP).

For ``W = U·diag(S)·Vᵀ`` (``[m, n]``, ``S`` descending):

- :func:`kept_rank` -- ``k`` from a fixed ``rank`` (capped at ``min(m, n)``) or, without one, the
  smallest ``k`` whose squares keep an ``energy`` fraction of ``Σσ²``
  (:func:`slimtune.weights.svd.rank_for_energy`; TRP's ``EnergyThreshold`` criterion);
- :func:`truncated` -- the rank-``k`` approximation ``U_k·diag(S_k)·V_kᵀ``;
- :func:`nuclear_subgradient` -- ``U_k·V_kᵀ``, a sub-gradient of ``||W||_* = Σσ_i``: with ``k``
  = the number of non-zero singular values (``k=None``: those above ``max(m, n)·eps·σ_max``, as
  numpy's ``matrix_rank``) it is the classical one; with the kept rank ``k`` of the truncation
  it is the sub-gradient of the truncated matrix, which TRP's released code adds.

Everything is computed in float32 (float64 for float64 input) from one exact SVD
(:func:`spectrum`) and returned in that precision; cast back yourself.
"""
from __future__ import annotations

import torch

from slimtune.weights.precision import compute_dtype
from slimtune.weights.svd import rank_for_energy

SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def spectrum(W: torch.Tensor) -> SVD:
    """The thin SVD ``(U [m, q], S [q], Vh [q, n])`` of a 2-D ``W``, ``q = min(m, n)``."""
    if W.ndim != 2 or W.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D weight matrix, got shape {tuple(W.shape)}")
    return torch.linalg.svd(W.detach().to(compute_dtype(W)), full_matrices=False)


def kept_rank(S: torch.Tensor, energy: float = 0.9, rank: int | None = None) -> int:
    """``min(rank, len(S))`` when ``rank`` is given, else the energy criterion on ``S``."""
    if rank is not None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        return min(int(rank), S.numel())
    return rank_for_energy(S, energy)


def nonzero_rank(S: torch.Tensor, shape: tuple[int, int]) -> int:
    """How many singular values exceed ``max(m, n)·eps·σ_max`` (at least 1 entry is kept only
    when ``σ_max > 0``)."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    tol = max(shape) * torch.finfo(S.dtype).eps * S[0]
    return int((S > tol).sum())


def truncated(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int) -> torch.Tensor:
    """``U_k·diag(S_k)·V_kᵀ``."""
    return (U[:, :k] * S[:k]) @ Vh[:k]


def nuclear_subgradient(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                        k: int | None = None) -> torch.Tensor:
    """``U_k·V_kᵀ`` over the top ``k`` singular pairs (``None``: the non-zero ones)."""
    if k is None:
        k = nonzero_rank(S, (U.shape[0], Vh.shape[1]))
    return U[:, :k] @ Vh[:k]
