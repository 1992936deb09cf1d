"""Layer Hessians and the damped inverse Cholesky factor that GPTQ and SparseGPT share.

For a linear layer with calibration inputs ``X [n, in]`` the layer-wise loss
``||X Wᵀ - X Ŵᵀ||² / n`` has, for every output row, the Hessian ``H = 2 G / n`` with ``G = XᵀX``.
GPTQ (Frantar et al., 2022: LLaMA-7B at 4 bits 6.09 and at 3 bits 8.07 WikiText-2 perplexity
vs 5.68 dense) and SparseGPT (Frantar & Alistarh, 2023: OPT-175B at 50% unstructured sparsity
with a negligible perplexity increase) both sweep the columns with the rows of the UPPER
Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``): row ``j`` of ``U`` divided by ``U_jj`` is the
optimal update of the columns after ``j`` once column ``j`` is fixed, and ``U_jj²`` is the
``[H_F⁻¹]_jj`` of the remaining columns (the reference codes' ``Hinv``).

- :func:`layer_hessian` -- ``2 G / n`` in float64 (always: these are small ``in × in``).
- :func:`fix_dead` -- dead inputs (``diag = 0``: always zero in calibration) get diagonal 1, as
  GPTQ's reference does. Their weight columns must be treated as zero: the solvers in
  :mod:`slimtune.weights.obs` read the dead inputs off the diagonal of the (undamped) ``H`` they
  are given and zero those columns of their working copy before anything else. An ``H`` whose
  dead diagonal was already set to 1 leaves those columns decoupled (row/column ``e_j``): they
  are then only rounded/pruned in place, which is harmless as their inputs are always 0.
- :func:`add_damping` -- ``H + damp · mean(diag H) · I`` (relative damping; the mean is taken
  after the dead fix, as in the reference).
- :func:`damped_hessian` -- the three above in a row.
- :func:`inverse_cholesky` -- takes the UNDAMPED ``H`` plus its own relative damping, so it can
  raise the damping (``× growth``) when a factorisation fails; both solvers call only this.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from slimtune.weights.precision import all_finite


def _square(H: Tensor, what: str) -> None:
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"{what} must be square, got shape {tuple(H.shape)}")


def layer_hessian(gram: Tensor, n_tokens: int) -> Tensor:
    """``2 · G / n`` in float64 for the input Gram ``G = XᵀX`` summed over ``n_tokens``."""
    _square(gram, "the Gram matrix")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    return gram.detach().to(torch.float64) * (2.0 / n_tokens)


def fix_dead(H: Tensor) -> tuple[Tensor, Tensor]:
    """``(H with diagonal 1 at the dead inputs, dead bool [in])`` (float64 copy)."""
    _square(H, "the Hessian")
    H = H.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    return H, dead


def add_damping(H: Tensor, damp: float) -> Tensor:
    """``H + damp · mean(diag H) · I``."""
    if not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    H = H.clone()
    torch.diagonal(H).add_(damp * torch.diagonal(H).mean())
    return H


def damped_hessian(gram: Tensor, n_tokens: int, damp: float = 0.01) -> Tensor:
    """``H = 2G/n + damp · mean(diag(2G/n)) · I`` in float64, dead inputs given diagonal 1."""
    return add_damping(fix_dead(layer_hessian(gram, n_tokens))[0], damp)


def inverse_cholesky(H: Tensor, damp: float = 0.01, max_tries: int = 6,
                     growth: float = 10.0) -> tuple[Tensor, float]:
    """``(U, used_damp)``: the upper Cholesky factor of ``(H_fixed + d·mean(diag)·I)⁻¹`` (float64,
    on ``H``'s device). GPTQ's reference computes it as ``cholesky(cholesky_inverse(cholesky(
    H_d)), upper=True)``; here one Cholesky and one triangular inverse give the same factor
    (0.6–0.8 of the time): with ``J`` the reversal, ``J H_d J = L Lᵀ`` makes ``H_d = ŨŨᵀ`` for
    the upper ``Ũ = J L J``, so ``H_d⁻¹ = UᵀU`` with ``U = Ũ⁻¹ = J L⁻¹ J``, upper with positive
    diagonal, hence the unique Cholesky factor. ``H`` is undamped (dead inputs are fixed here,
    idempotently); ``d`` starts at ``damp`` and is multiplied by ``growth`` after every failed or
    non-finite factorisation, up to ``max_tries`` attempts; ``used_damp`` is the ``d`` that
    worked. ValueError for a non-finite ``H`` or when every attempt fails."""
    if isinstance(max_tries, bool) or not isinstance(max_tries, int) or max_tries < 1:
        raise ValueError(f"max_tries must be a positive int, got {max_tries!r}")
    if not growth > 1:
        raise ValueError(f"growth must be > 1, got {growth!r}")
    H, _ = fix_dead(H)
    if not all_finite(H):
        raise ValueError("the Hessian has NaN or infinite entries (corrupt calibration "
                         "statistics); its Cholesky factorisation is undefined")
    d = float(damp)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(max_tries):
        if attempt:
            d *= growth
        L, info = torch.linalg.cholesky_ex(add_damping(H, d).flip(0, 1))
        if int(info) != 0:  # a finite H factored without error has a finite L
            continue
        U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
        if all_finite(U):
            return U, d
    raise ValueError(f"Cholesky of the Hessian failed even with damping {d:g} (relative to "
                     f"mean(diag H), after {max_tries} tries from {damp:g}); the calibration "
                     "Gram is too ill-conditioned: use more calibration tokens or a larger damp")
