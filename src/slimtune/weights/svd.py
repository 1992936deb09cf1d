"""Truncated, randomized and scaled SVDs of weight matrices, and rank/spectrum helpers.

Weights follow ``nn.Linear``: ``W`` is ``[out, in]`` = ``[m, n]``. Every SVD routine returns
``(U_r [m, r], S_r [r], Vh_r [r, n])`` with ``U_r @ diag(S_r) @ Vh_r`` the rank-``r`` approximation.

Routines and what they are for:

- :func:`truncated_svd` -- exact rank-``r`` SVD (Eckart-Young optimal in the Frobenius norm). Used
  for PiSSA-style LoRA initialisation (Meng et al. 2024: the adapter starts from the top-``r``
  singular triplets, the residual stays frozen) and for plain SVD compression.
- :func:`gram_svd` -- the same exact top-``r`` triplets from the eigendecomposition of the
  float64 Gram matrix of the shorter side (``W Wᵀ`` or ``Wᵀ W``): one GEMM and one symmetric
  eigensolver instead of a full SVD; in float64 its top triplets are at least as accurate as a
  float32 SVD (falls back to :func:`truncated_svd` when ``σ_r`` is too small to divide by).
- :func:`randomized_svd` -- Halko, Martinsson & Tropp (2011), "Finding structure with randomness":
  Gaussian sketch, power iterations with QR re-orthonormalisation, then an exact SVD of the small
  projected matrix. Much faster than a full SVD when ``r << min(m, n)``; deterministic per ``seed``.
- :func:`scaled_svd` -- SVD of ``W @ S`` folded back through ``S^-1``, i.e. the rank-``r``
  approximation that is optimal in the ``S``-weighted norm ``||(W - W_r) S||_F``:
  ``kind="diag"``: ``S = diag(s)``, per-input-channel scaling, as in ASVD (Yuan et al. 2023,
  ``s`` = mean |activation| ** alpha). ``kind="cholesky"``: ``S = L`` with ``L L^T = X^T X``, the
  truncation-aware data whitening of SVD-LLM (Wang et al. 2024), under which
  ``||(W - W_r) L||_F = ||X (W - W_r)^T||_F`` (the layer's output error on the calibration
  inputs ``X``) and the loss of dropping singular value ``i`` of ``W L`` is exactly ``sigma_i^2``.
- :func:`whitening_factor` -- the robust (damped, with fallbacks) Cholesky factor ``L`` for the above.
- :func:`balanced_split` -- factors ``(A, B)`` of ``U diag(S) Vh`` with ``sqrt(S)`` on both sides.
- :func:`rank_for_ratio`, :func:`rank_for_energy` -- pick ``r`` from a parameter budget or an
  energy target; :func:`stable_rank`, :func:`effective_rank` (Roy & Vetterli 2007) and
  :func:`energy_kept` -- scalar summaries of a spectrum.

Precision and devices: SVDs run on ``W``'s device in float32, or float64 when the input is float64
(half-precision inputs are upcast). Factors are returned in that compute dtype; cast them yourself.
Signs are made deterministic: each left singular vector is flipped so that its largest-magnitude
entry is positive (the matching row of ``Vh`` is flipped too), so exact and randomized factors are
directly comparable.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch

from slimtune.weights.precision import all_finite, compute_dtype

SVDFactors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_matrix_and_rank(W: torch.Tensor, r: int) -> None:
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {tuple(W.shape)}")
    if W.is_complex() or not W.is_floating_point():
        raise ValueError(f"expected a real floating-point matrix, got dtype {W.dtype}")
    limit = min(W.shape)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= limit:
        raise ValueError(f"rank r must be an int in [1, {limit}] for shape {tuple(W.shape)}, got {r!r}")


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-|.| entry of the left vector is positive."""
    peak_rows = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(U.gather(0, peak_rows)).squeeze(0)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs[:, None]


def truncated_svd(W: torch.Tensor, r: int) -> SVDFactors:
    """Exact top-``r`` SVD of ``W`` ``[m, n]`` via ``torch.linalg.svd(full_matrices=False)``.

    Returns ``(U_r [m, r], S_r [r], Vh_r [r, n])`` in float32 (float64 if ``W`` is float64), with
    ``S_r`` descending and the deterministic sign convention of this module.
    """
    _check_matrix_and_rank(W, r)
    A = W.detach().to(compute_dtype(W))
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    U_r, Vh_r = _fix_signs(U[:, :r], Vh[:r])
    return U_r, S[:r].clone(), Vh_r


def gram_svd(W: torch.Tensor, r: int) -> SVDFactors:
    """Exact top-``r`` SVD through ``eigh`` of the float64 Gram matrix of ``W``'s shorter side.

    With ``m <= n``: ``W Wᵀ = U diag(S²) Uᵀ``, then ``Vh_r = diag(1/S_r) U_rᵀ W`` (transposed
    roles otherwise). Squaring the condition number costs relative accuracy only in singular
    values below ``~1e-8·σ_1``; when ``σ_r`` is that small the LAPACK SVD is used instead.
    Same return convention and dtype as :func:`truncated_svd`.
    """
    _check_matrix_and_rank(W, r)
    out_dtype = compute_dtype(W)
    A = W.detach().to(torch.float64)
    wide = A.shape[0] <= A.shape[1]
    G = A @ A.mT if wide else A.mT @ A
    evals, evecs = torch.linalg.eigh(G)
    S = evals[-r:].flip(0).clamp_min(0).sqrt()
    if not S[-1] > 1e-8 * S[0]:
        return truncated_svd(W, r)
    Q = evecs[:, -r:].flip(1)
    if wide:
        U, Vh = Q, (Q.mT @ A) / S[:, None]
    else:
        U, Vh = (A @ Q) / S, Q.mT
    U, Vh = _fix_signs(U, Vh)
    return U.to(out_dtype), S.to(out_dtype), Vh.to(out_dtype)


def randomized_svd(W: torch.Tensor, r: int, oversample: int = 10, n_iter: int = 4,
                   seed: int = 0) -> SVDFactors:
    """Approximate top-``r`` SVD by the Halko-Martinsson-Tropp randomized range finder.

    Draws a Gaussian test matrix with ``r + oversample`` columns from a ``torch.Generator`` seeded
    with ``seed`` on ``W``'s device (same inputs and seed give bitwise-identical factors on the same
    device and thread count), runs ``n_iter`` power iterations re-orthonormalising with QR after
    every product, and takes the exact SVD of the small projection ``Q^T W`` (via ``eigh`` of its
    float64 Gram matrix). Returns the same triple and dtype as :func:`truncated_svd`.
    """
    _check_matrix_and_rank(W, r)
    if oversample < 0 or n_iter < 0:
        raise ValueError(f"oversample and n_iter must be >= 0, got {oversample}, {n_iter}")
    A = W.detach().to(compute_dtype(W))
    m, n = A.shape
    sketch_size = min(r + oversample, m, n)
    generator = torch.Generator(device=A.device)
    generator.manual_seed(seed)
    omega = torch.randn(n, sketch_size, generator=generator, device=A.device, dtype=A.dtype)
    Q, _ = torch.linalg.qr(A @ omega)
    for _ in range(n_iter):
        Z, _ = torch.linalg.qr(A.mT @ Q)
        Q, _ = torch.linalg.qr(A @ Z)
    U_small, S, Vh = _short_wide_svd(Q.mT @ A, r)
    U_r, Vh_r = _fix_signs(Q @ U_small, Vh)
    return U_r, S, Vh_r


def _short_wide_svd(B: torch.Tensor, r: int) -> SVDFactors:
    """Top-``r`` SVD of a short, wide ``B [k, n]`` (k << n) through ``eigh`` of its float64
    ``k × k`` Gram matrix (cheaper than LAPACK's SVD of ``B``); LAPACK if ``σ_r`` is tiny."""
    Bd = B.to(torch.float64)
    evals, evecs = torch.linalg.eigh(Bd @ Bd.mT)
    S = evals[-r:].flip(0).clamp_min(0).sqrt()
    if not S[-1] > 1e-8 * S[0]:
        U, S, Vh = torch.linalg.svd(B, full_matrices=False)
        return U[:, :r], S[:r].clone(), Vh[:r]
    U = evecs[:, -r:].flip(1)
    return U.to(B.dtype), S.to(B.dtype), ((U.mT @ Bd) / S[:, None]).to(B.dtype)


def scaled_svd(W: torch.Tensor, S: torch.Tensor, r: int, kind: str, method: str = "exact",
               oversample: int = 10, n_iter: int = 4, seed: int = 0) -> SVDFactors:
    """Rank-``r`` SVD of ``W`` in the ``S``-weighted norm: decompose ``W @ S``, fold ``S^-1`` back.

    ``kind="diag"``: ``S`` is a positive vector ``s`` of length ``n`` (``W @ diag(s)``, ASVD).
    ``kind="cholesky"``: ``S`` is a lower-triangular ``L`` ``[n, n]`` (``C = L L^T``, SVD-LLM), e.g.
    from :func:`whitening_factor`. Returns ``(U_r, S_r, Vh_folded)`` where ``Vh_folded = Vh_r S^-1``
    (columns divided by ``s``, or a triangular solve -- never an explicit inverse), so
    ``U_r diag(S_r) Vh_folded`` minimises ``||(W - W_r) S||_F`` over rank-``r`` ``W_r``; ``S_r`` are
    the singular values of ``W @ S``. ``method`` is ``"exact"`` or ``"randomized"`` (then
    ``oversample``, ``n_iter``, ``seed`` are passed on). Computes in float64 if ``W`` or ``S`` is
    float64, else float32, on ``W``'s device.
    """
    _check_matrix_and_rank(W, r)
    if method not in ("exact", "randomized"):
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
    n = W.shape[1]
    dtype = compute_dtype(W, S)
    A = W.detach().to(dtype)
    scale = S.detach().to(device=A.device, dtype=dtype)
    if kind == "diag":
        if scale.shape != (n,):
            raise ValueError(f"diag scaling must have shape ({n},), got {tuple(scale.shape)}")
        if not bool(torch.all(torch.isfinite(scale) & (scale > 0))):
            raise ValueError("diag scaling must be finite and > 0 (clamp it, e.g. s.clamp_min(1e-6))")
        scaled = A * scale
    elif kind == "cholesky":
        if scale.shape != (n, n):
            raise ValueError(f"cholesky factor must have shape ({n}, {n}), got {tuple(scale.shape)}")
        scaled = A @ scale
    else:
        raise ValueError(f"kind must be 'diag' or 'cholesky', got {kind!r}")

    if method == "exact":
        U_r, S_r, Vh_r = truncated_svd(scaled, r)
    else:
        U_r, S_r, Vh_r = randomized_svd(scaled, r, oversample=oversample, n_iter=n_iter, seed=seed)

    if kind == "diag":
        Vh_folded = Vh_r / scale
    else:  # solve X L = Vh_r for X = Vh_r L^-1
        Vh_folded = torch.linalg.solve_triangular(scale, Vh_r, upper=False, left=False)
    return U_r, S_r, Vh_folded


def whitening_factor(C: torch.Tensor, damp: float = 1e-2, max_tries: int = 6,
                     growth: float = 10.0, eig_floor: float = 1e-10) -> torch.Tensor:
    """Lower-triangular ``L`` (float64, on ``C``'s device) with ``L L^T ~= C``, for SVD-LLM whitening.

    ``C`` is the ``[n, n]`` input covariance or Gram matrix ``X^T X`` (the scale does not matter).
    It is symmetrised and damped as ``C + lam * mean(diag C) * I`` with ``lam = damp`` (relative
    damping, the convention of GPTQ's ``percdamp``; ``damp=0`` gives SVD-LLM's undamped factor).
    Fallbacks, each announced with a ``RuntimeWarning``:

    1. If the Cholesky fails (``C`` singular or indefinite in floating point), ``lam`` is raised
       geometrically -- to ``max(lam, 1e-8) * growth`` -- and the factorisation retried, up to
       ``max_tries`` times.
    2. If it still fails, an eigen-decomposition fallback: eigenvalues are clamped to
       ``eig_floor * max_eigenvalue`` (in the spirit of SVD-LLM's reference code, which shifts the
       spectrum by ``-lambda_min + 1e-6``), giving ``F = V sqrt(Lambda)`` with ``F F^T = C``; the QR
       of ``F^T`` turns it into the lower-triangular ``L = R^T`` without a second Cholesky.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"covariance must be square, got shape {tuple(C.shape)}")
    if damp < 0 or growth <= 1 or max_tries < 0:
        raise ValueError("need damp >= 0, growth > 1, max_tries >= 0")
    C64 = C.detach().to(torch.float64)
    if not all_finite(C64):
        raise ValueError("covariance contains NaN or Inf")
    C64 = (C64 + C64.mT) / 2
    n = C64.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=C64.device)
    diag_mean = C64.diagonal().mean().item()
    scale = diag_mean if diag_mean > 0 else 1.0

    lam = damp
    for attempt in range(max_tries + 1):
        L, info = torch.linalg.cholesky_ex(C64 + (lam * scale) * eye if lam > 0 else C64)
        if int(info) == 0 and all_finite(L):
            if attempt > 0:
                warnings.warn(f"whitening_factor: Cholesky needed damping {lam:.3g} (asked {damp:.3g})",
                              RuntimeWarning, stacklevel=2)
            return L
        lam = max(lam, 1e-8) * growth

    warnings.warn("whitening_factor: Cholesky failed after damping; using eigen-decomposition fallback",
                  RuntimeWarning, stacklevel=2)
    eigvals, eigvecs = torch.linalg.eigh(C64)
    floor = eig_floor * max(eigvals.max().item(), 0.0) or eig_floor
    F = eigvecs * eigvals.clamp_min(floor).sqrt()
    _, R = torch.linalg.qr(F.mT)
    L = R.mT
    signs = torch.sign(L.diagonal())
    return L * torch.where(signs == 0, torch.ones_like(signs), signs)


def balanced_split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scale·B·A = U·diag(S)·Vh``: ``A = sqrt(S/scale)·Vh``, ``B = U·sqrt(S/scale)``.

    The square root of the spectrum goes to both factors, so neither carries the whole scale
    (SVD compression's storage split; PiSSA's adapter init, whose low-rank scale ``s`` divides the
    singular values so that the scaled product is the principal part itself).
    """
    root = (S / scale).clamp_min(0).sqrt()
    return root[:, None] * Vh, U * root


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank ``k = floor(ratio * m * n / (m + n))`` so ``k * (m + n)`` keeps a ``ratio`` of ``m * n``.

    ``ratio`` is the fraction of parameters KEPT, in ``(0, 1]``; the result is at least 1.
    """
    for name, value in (("m", m), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
        raise ValueError(f"ratio (fraction of parameters kept) must be in (0, 1], got {ratio!r}")
    m, n, ratio = int(m), int(n), float(ratio)
    k = math.floor(ratio * m * n / (m + n) + 1e-9)  # the epsilon absorbs float round-off
    return max(1, k)


def _spectrum(S: torch.Tensor) -> torch.Tensor:
    if S.ndim != 1 or S.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D vector of singular values, got {tuple(S.shape)}")
    return S.detach().to(torch.float64)


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """Smallest ``k >= 1`` with ``sum(S[:k]^2) / sum(S^2) >= energy``; ``S`` sorted descending.

    ``energy`` must be in ``(0, 1]``. An all-zero spectrum returns 1.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    sq = _spectrum(S) ** 2
    total = sq.sum()
    if total <= 0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    k = int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=kept.dtype,
                                                  device=kept.device)).item()) + 1
    return min(k, S.numel())


def stable_rank(S: torch.Tensor) -> float:
    """Stable rank ``sum(sigma^2) / max(sigma)^2``; 0.0 for an all-zero spectrum."""
    sq = _spectrum(S) ** 2
    top = sq.max()
    return float(sq.sum() / top) if top > 0 else 0.0


def effective_rank(S: torch.Tensor) -> float:
    """Effective rank ``exp(H(p))``, ``p = sigma / sum(sigma)`` (Roy & Vetterli 2007); 0.0 if all zero."""
    s = _spectrum(S).abs()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()
    return float(torch.exp(entropy))


def energy_kept(S: torch.Tensor, r: int) -> float:
    """Fraction ``sum(S[:r]^2) / sum(S^2)`` of squared Frobenius norm kept at rank ``r`` (1.0 if zero)."""
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    sq = _spectrum(S) ** 2
    total = sq.sum()
    return float(sq[:r].sum() / total) if total > 0 else 1.0
