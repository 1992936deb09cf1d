"""Low-rank update math for merging LoRA adapters without densifying them.

An update is a pair ``(B [out, r], A [r, in])`` with ``ΔW = B·A`` (any scale folded into ``B``);
``r = 0`` is allowed (no update). Pure tensor functions on the inputs' device:

- :func:`stack_factors`: ``Σ cᵢ BᵢAᵢ = [c₁B₁, …, cₖBₖ]·[A₁; …; Aₖ]`` exactly (FLoRA's stacking).
- :func:`shared_basis`: the SVD of the updates side by side, ``[ΔW₁, …, ΔWₖ] = U·S·[V₁ᵀ, …, Vₖᵀ]``
  (KnOTS's shared basis), computed from the factors through one QR of ``[B₁, …, Bₖ]`` and the
  SVD of a ``Σrᵢ × k·in`` matrix, or from dense matrices; singular values below
  ``max(shape)·eps·S₁`` are dropped (the rest are numerically zero).
- :func:`rank_one_units` and :func:`kmeans`: LoRA-LEGO's units (one rank of one LoRA:
  ``[aⱼ; bⱼ]``) and a seeded k-means (k-means++ start, Lloyd steps).
"""
from __future__ import annotations

import torch

Factors = tuple[torch.Tensor, torch.Tensor]


def stack_factors(factors: list[Factors], coefficients: torch.Tensor) -> Factors:
    """``(B, A)`` with ``B·A = Σ cᵢ BᵢAᵢ`` exactly, rank ``Σ rᵢ``."""
    B = torch.cat([c * Bi for c, (Bi, _) in zip(coefficients.reshape(-1), factors)], dim=1)
    return B, torch.cat([Ai for _, Ai in factors], dim=0)


def _keep_numerical_rank(U, S, Vh, shape) -> tuple:
    if S.numel() == 0:
        return U, S, Vh
    tol = max(shape) * torch.finfo(S.dtype).eps * S[0]
    keep = int((S > tol).sum())
    return U[:, :keep], S[:keep], Vh[:keep]


def shared_basis(factors: list[Factors] | None = None,
                 dense: list[torch.Tensor] | None = None) -> tuple:
    """``(U [out, R], S [R], [V₁ᵀ, …, Vₖᵀ] each [R, in])`` with ``ΔWᵢ = U·diag(S)·Vᵢᵀ`` for
    every i; from ``factors`` or from ``dense`` matrices (exactly one of them)."""
    if (factors is None) == (dense is None):
        raise ValueError("pass either factors or dense matrices")
    if dense is not None:
        n_in = dense[0].shape[1]
        U, S, Vh = torch.linalg.svd(torch.cat(dense, dim=1), full_matrices=False)
        U, S, Vh = _keep_numerical_rank(U, S, Vh, (dense[0].shape[0], n_in * len(dense)))
        return U, S, [Vh[:, i * n_in:(i + 1) * n_in] for i in range(len(dense))]
    n_in = factors[0][1].shape[1]
    B = torch.cat([Bi for Bi, _ in factors], dim=1)
    Q, R = torch.linalg.qr(B)
    blocks, start = [], 0
    for Bi, Ai in factors:
        blocks.append(R[:, start:start + Bi.shape[1]] @ Ai)
        start += Bi.shape[1]
    Up, S, Vh = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    U, S, Vh = _keep_numerical_rank(Q @ Up, S, Vh, (B.shape[0], n_in * len(factors)))
    return U, S, [Vh[:, i * n_in:(i + 1) * n_in] for i in range(len(factors))]


def rank_one_units(factors: list[Factors], coefficients: torch.Tensor) -> tuple:
    """``(a [N, in], b [N, out])``: every rank of every update as a unit ``b·aᵀ`` (b scaled by
    its model's coefficient), sign-normalised so that each ``a``'s largest-magnitude entry is
    positive (``b·aᵀ = (−b)·(−a)ᵀ``: the same unit either way)."""
    a = torch.cat([Ai for _, Ai in factors], dim=0)
    b = torch.cat([c * Bi for c, (Bi, _) in zip(coefficients.reshape(-1), factors)], dim=1).T
    if a.shape[0]:
        pivot = a.gather(1, a.abs().argmax(dim=1, keepdim=True)).sign()
        pivot[pivot == 0] = 1
        a, b = a * pivot, b * pivot
    return a, b


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator | None = None,
           iterations: int = 50) -> torch.Tensor:
    """Cluster labels ``[N]`` in ``[0, k)`` (every cluster non-empty when ``N >= k``):
    k-means++ seeding from ``generator``, then Lloyd steps until the labels stop changing."""
    n = points.shape[0]
    if n <= k:
        return torch.arange(n, device=points.device)
    x = points.double()
    first = int(torch.randint(n, (1,), generator=generator, device=points.device))
    centres = x[first:first + 1]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).min(dim=1).values ** 2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        pick = int(torch.multinomial(probs, 1, generator=generator))
        centres = torch.cat([centres, x[pick:pick + 1]])
    labels = None
    for _ in range(iterations):
        new = torch.cdist(x, centres).argmin(dim=1)
        counts = torch.bincount(new, minlength=k)
        for empty in torch.nonzero(counts == 0).reshape(-1).tolist():
            far = int(torch.cdist(x, centres).min(dim=1).values.argmax())
            new[far] = empty  # an empty cluster takes the point farthest from every centre
            centres[empty] = x[far]
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        centres = sums / torch.bincount(labels, minlength=k).clamp(min=1)[:, None].to(x.dtype)
    return labels
