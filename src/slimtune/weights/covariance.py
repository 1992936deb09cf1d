"""Covariance-oriented SVD of a weight (CorDA's decomposition), with an inversion-checked damping.

- :func:`damped_inverse` -- ``C_d = C + lam·mean(diag C)·I`` and its explicit inverse, with
  ``lam`` starting at ``damp`` and doubling until ``||C_d·C_d⁻¹ - I||_F < tol`` (the criterion of
  CorDA's reference code and PEFT). The criterion measures how well the inverse can be computed in
  the working precision, so float32 may need more damping than float64 for the same ``C``; it is
  invariant to a uniform scale of ``C`` (up to round-off).
- :func:`covariance_svd` -- ``W·C_d = U·diag(S)·Vh`` and ``V = (Vh·C_d⁻¹)ᵀ``, so that
  ``U·diag(S)·Vᵀ = W`` exactly (all components); the leading components are the directions in
  which ``W`` acts most strongly on the inputs that ``C`` describes.
"""
from __future__ import annotations

import torch

from slimtune.weights.precision import all_finite

SVDFactors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def damped_inverse(C: torch.Tensor, damp: float = 0.01, tol: float = 0.05,
                   max_doublings: int = 60) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(C_d, C_d⁻¹, lam)`` for a symmetric ``[n, n]`` ``C`` (see the module docstring).

    Computes in ``C``'s dtype (float32 or float64). Raises ValueError for a non-square or
    non-finite ``C``, or if ``max_doublings`` doublings do not meet the criterion.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"covariance must be square, got shape {tuple(C.shape)}")
    if C.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"covariance must be float32 or float64, got {C.dtype}")
    if damp <= 0 or tol <= 0:
        raise ValueError(f"damp and tol must be > 0, got {damp}, {tol}")
    if not all_finite(C):
        raise ValueError("covariance contains NaN or Inf")
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    level = torch.diag(C).mean()  # a contiguous copy: the same float32 sum as PEFT's
    if not level > 0:
        raise ValueError("covariance has no positive diagonal (all inputs zero?)")
    lam = damp
    for _ in range(max_doublings + 1):
        C_d = C + (lam * level) * eye
        C_inv = torch.linalg.inv(C_d)
        if float(torch.linalg.matrix_norm(C_d @ C_inv - eye)) < tol:
            return C_d, C_inv, lam
        lam *= 2
    raise ValueError(f"damped_inverse: ||C_d C_d^-1 - I||_F stayed >= {tol} up to damping "
                     f"{lam / 2:.3g}")


def covariance_svd(W: torch.Tensor, C_d: torch.Tensor, C_inv: torch.Tensor) -> SVDFactors:
    """``(U [m, k], S [k], V [n, k])``, ``k = min(m, n)``, S descending: ``W·C_d = U·S·Vhᵀ``,
    ``V = (Vh·C_d⁻¹)ᵀ``. Computes in ``C_d``'s dtype on ``C_d``'s device."""
    if W.ndim != 2 or C_d.shape != (W.shape[1], W.shape[1]) or C_inv.shape != C_d.shape:
        raise ValueError(f"need W [m, n] with C_d, C_inv [n, n]; got {tuple(W.shape)}, "
                         f"{tuple(C_d.shape)}, {tuple(C_inv.shape)}")
    U, S, Vh = torch.linalg.svd(W.detach().to(C_d) @ C_d, full_matrices=False)
    return U, S, (Vh @ C_inv).mT
