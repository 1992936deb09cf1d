"""Low-rank and sparse splits of a weight or of a compression error (pure tensor math).

- :func:`eora_factors` (EoRA, Liu et al. 2024): the rank-``r`` ``B·A`` that best repairs an error
  ``ΔW = W - W_c`` *on the calibration inputs*: minimise ``||(ΔW - B·A)·Xᵀ||_F``. With the input
  covariance ``C = XᵀX/n = QΛQᵀ`` this is the truncated SVD of ``ΔW·QΛ^½`` (``= U Σ Vᵀ``), mapped
  back: ``B = U_r Σ_r^½``, ``A = Σ_r^½ V_rᵀ Λ^-½ Qᵀ``. Eigenvalues below ``rel_eps · λ_max`` are
  raised to it (dead or nearly dead inputs would make ``Λ^-½`` blow up). With ``C = I`` it is the
  plain truncated SVD of ``ΔW``.
- :func:`principal_split` (SVDQuant's low-rank branch, LOST / SLTrain's low-rank part): the top-``r``
  SVD part ``L = B·A`` of ``W`` and the residual ``W - L``.
- :func:`top_entries`: the flat indices of the ``k`` largest scores (the kept entries of a sparse
  part), ties broken by position.

All factors come back in float64 on the input's device; ``A`` is ``[r, in]``, ``B`` ``[out, r]``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.weights.svd import balanced_split, truncated_svd


def eora_factors(delta: Tensor, C: Tensor, rank: int, rel_eps: float = 1e-8) -> tuple[Tensor,
                                                                                     Tensor]:
    """``(A, B)`` of EoRA for the error ``delta [out, in]`` and input covariance ``C [in, in]``."""
    if delta.ndim != 2 or C.shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(f"expected an error [out, in] and a covariance [in, in]; got "
                         f"{tuple(delta.shape)} and {tuple(C.shape)}")
    D = delta.detach().to(torch.float64)
    lam, Q = torch.linalg.eigh(C.detach().to(device=D.device, dtype=torch.float64))
    if not bool(torch.isfinite(lam).all()) or float(lam.max()) <= 0:
        raise ValueError("the input covariance is zero or not finite: no calibration signal")
    root = lam.clamp_min(rel_eps * float(lam.max())).sqrt()
    U, S, Vh = truncated_svd(D @ (Q * root), rank)
    A, B = balanced_split(U, S, Vh)
    return (A / root) @ Q.mT, B


def principal_split(W: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, B, W - B·A)``: the top-``rank`` SVD part of ``W`` (balanced factors) and the rest."""
    W64 = W.detach().to(torch.float64)
    A, B = balanced_split(*truncated_svd(W64, rank))
    return A, B, W64 - B @ A


def top_entries(scores: Tensor, k: int) -> Tensor:
    """Flat indices (sorted) of the ``k`` largest of ``scores`` (the earlier entry wins ties)."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} entries")
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
    return torch.sort(order[:k]).values
