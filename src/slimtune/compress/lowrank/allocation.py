"""Rank allocation: how many ranks each targeted matrix keeps under one global parameter budget.

Budget: ``ratio`` is the fraction of the targeted parameters KEPT. The targets together hold
``sum(m*n)`` parameters; the budget is ``ratio * sum(m*n)``. A matrix factored at rank ``k`` holds
``k*(m + n)`` parameters; a matrix left dense holds ``m*n``.

- :func:`uniform_ranks` -- every matrix gets ``k = rank_for_ratio(m, n, ratio)``.
- :func:`welore_ranks` -- WeLore (Jaiswal et al. 2024, "From GaLore to WeLore: How Low-Rank Weights
  Non-uniformly Emerge from Low-Rank Gradients"): singular spectra are heavy-tailed and differ
  between layers, so one *global* threshold ``t`` on the normalised singular values
  ``sigma_i / sigma_1`` sets every matrix's rank ``k = #{i: sigma_i / sigma_1 >= t}``; ``t`` is the
  smallest value whose total stays within the budget (found by bisection over the sorted values,
  so the total is within one rank of the budget). A matrix whose rank would not save parameters
  (``k*(m+n) >= m*n``) stays dense (a "non-low-rank component" in the paper's words).
- :func:`loss_curve` + :func:`allocate_by_loss` -- sensitivity allocation: each matrix has a
  curve of calibration loss against kept parameters (a few candidate ratios); choose one point per
  matrix so the total parameters stay within budget and the summed loss is least (Lagrangian
  relaxation + greedy fill of the leftover budget; never worse than the uniform choice). In the
  spirit of ASVD's sensitivity-based rank search (Yuan et al. 2023), which measures perplexity per
  layer at a grid of ratios; here the cheap, exact layer-output loss replaces perplexity.

Pure tensor/number code: no modules, no I/O.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slimtune.weights.svd import rank_for_ratio

def kept_params(m: int, n: int, k: int | None) -> int:
    """Parameters a matrix holds at rank ``k`` (``None`` = dense)."""
    return m * n if k is None else k * (m + n)


def budget(shapes: dict[str, tuple[int, int]], ratio: float) -> float:
    """The parameter budget ``ratio * sum(m*n)`` over the targeted matrices."""
    return ratio * sum(m * n for m, n in shapes.values())


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    return {name: rank_for_ratio(m, n, ratio) for name, (m, n) in shapes.items()}


def welore_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                 ratio: float) -> dict[str, int | None]:
    """Per-matrix ranks from one global threshold on the normalised singular values.

    ``spectra[name]`` is the descending singular values of that matrix (in whatever metric the
    method factorises). Returns ``{name: k}`` with ``None`` for matrices left dense. The total
    ``sum(kept_params)`` is at most ``budget(shapes, ratio)`` and, unless every matrix is already at
    rank 1, short of it by less than one rank of one matrix (ties aside).
    """
    target = budget(shapes, ratio)
    names = list(spectra)
    normed = {}
    for name in names:
        s = spectra[name].detach().to(torch.float64).cpu()
        top = float(s[0]) if s.numel() else 0.0
        normed[name] = s / top if top > 0 else torch.zeros_like(s)

    def ranks_at(t: float) -> dict[str, int | None]:
        out = {}
        for name in names:
            m, n = shapes[name]
            k = max(1, int((normed[name] >= t).sum()))
            out[name] = None if k * (m + n) >= m * n else k
        return out

    def total(ranks) -> int:
        return sum(kept_params(*shapes[nm], ranks[nm]) for nm in names)

    # total(t) is non-increasing in t; candidate thresholds are the normalised values themselves
    ones = torch.ones(1, dtype=torch.float64)
    values = torch.unique(torch.cat([normed[nm] for nm in names] + [ones]))
    lo, hi = 0, len(values) - 1  # values sorted ascending; values[hi] = 1 keeps rank 1 everywhere
    if total(ranks_at(float(values[hi]))) > target:
        return ranks_at(float(values[hi]))  # even rank 1 everywhere is over budget: best possible
    while lo < hi:  # smallest index whose total fits
        mid = (lo + hi) // 2
        if total(ranks_at(float(values[mid]))) <= target:
            hi = mid
        else:
            lo = mid + 1
    return ranks_at(float(values[lo]))


# -- sensitivity ------------------------------------------------------------------------------
@dataclass
class CurvePoint:
    ratio: float          # the candidate ratio (1.0 = dense)
    rank: int | None      # None = dense
    params: int
    loss: float           # normalised calibration loss ||(W - W_k) X^T||^2 / ||W X^T||^2


def truncation_losses(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
                      gram: torch.Tensor) -> torch.Tensor:
    """Calibration loss ``||(W - W_k) X^T||_F^2 = tr(dW G dW^T)`` for every ``k = 0 .. r``.

    ``U [m, r]``, ``S [r]``, ``Vh [r, n]`` is a full-rank factorisation ``W = U diag(S) Vh`` (the
    method's own, possibly folded: neither ``U`` nor ``Vh`` need be orthonormal) and ``G = X^T X``.
    With ``M = (U^T U) * (Vh G Vh^T) * (S S^T)`` the loss after keeping the first ``k``
    components is ``sum(M[k:, k:])``; all of them come from one 2-D suffix sum, in float64.
    Entry 0 is ``||W X^T||^2``, entry ``r`` is 0. For SVD-LLM's undamped whitening ``M`` is
    diagonal and this is exactly the sum of the discarded whitened ``sigma_i^2``; with damping (or
    for the other methods) it is still the true loss on the calibration inputs, not the method's
    own objective.
    """
    U, S, Vh = (t.detach().to(torch.float64) for t in (U, S, Vh))
    G = gram.detach().to(device=U.device, dtype=torch.float64)
    M = (U.mT @ U) * (Vh @ G @ Vh.mT) * torch.outer(S, S)
    suffix = M.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1)
    out = torch.zeros(S.numel() + 1, dtype=torch.float64, device=U.device)
    out[:-1] = suffix.diagonal()
    return out.clamp_min(0).cpu()


def loss_curve(losses: torch.Tensor, m: int, n: int, ratios) -> list[CurvePoint]:
    """Curve points at candidate ``ratios`` from :func:`truncation_losses` output, normalised by
    ``losses[0] = ||W X^T||^2``. Ratio ``1.0`` is the dense matrix (loss 0, ``m*n`` parameters)."""
    full = float(losses[0])
    norm = full if full > 0 else 1.0
    r = losses.numel() - 1
    points = []
    for rho in sorted(set(float(x) for x in ratios)):
        if rho >= 1.0:
            points.append(CurvePoint(1.0, None, m * n, 0.0))
            continue
        k = min(rank_for_ratio(m, n, rho), r)
        points.append(CurvePoint(rho, k, k * (m + n), float(losses[k]) / norm))
    return points


def allocate_by_loss(curves: dict[str, list[CurvePoint]], target: float,
                     baseline: dict[str, int] | None = None) -> dict[str, CurvePoint]:
    """One point per matrix: total ``params <= target`` with (approximately) least summed loss.

    Multiple-choice knapsack, solved by Lagrangian relaxation (each matrix minimises
    ``loss + lam * params``; ``lam`` bisected to the smallest value that fits) followed by a greedy
    fill of the leftover budget (best loss decrease per added parameter first). If ``baseline``
    (an index into each curve, e.g. the uniform choice) is feasible and better, it is returned
    instead, so the result is never worse than it. When even the cheapest points exceed the
    budget, the cheapest points are returned.
    """
    names = list(curves)

    def pick(lam: float) -> dict[str, int]:
        return {nm: min(range(len(curves[nm])),
                        key=lambda i: (curves[nm][i].loss + lam * curves[nm][i].params,
                                       curves[nm][i].params))
                for nm in names}

    def params(choice) -> int:
        return sum(curves[nm][choice[nm]].params for nm in names)

    def loss(choice) -> float:
        return sum(curves[nm][choice[nm]].loss for nm in names)

    cheapest = {nm: min(range(len(curves[nm])), key=lambda i: curves[nm][i].params) for nm in names}
    if params(cheapest) > target:
        return {nm: curves[nm][cheapest[nm]] for nm in names}
    lo, hi = 0.0, 1.0
    while params(pick(hi)) > target:
        hi *= 4.0
        if hi > 1e30:
            break
    if params(pick(lo)) <= target:
        choice = pick(lo)
    else:
        for _ in range(200):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e12
            if params(pick(mid)) <= target:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
        choice = pick(hi)
    if params(choice) > target:
        choice = cheapest
    # greedy fill: upgrade to a point with more parameters while the budget allows
    spare = target - params(choice)
    while True:
        best, best_gain = None, 0.0
        for nm in names:
            cur = curves[nm][choice[nm]]
            for i, p in enumerate(curves[nm]):
                extra = p.params - cur.params
                if extra > 0 and extra <= spare and p.loss < cur.loss:
                    gain = (cur.loss - p.loss) / extra
                    if gain > best_gain:
                        best, best_gain = (nm, i, extra), gain
        if best is None:
            break
        nm, i, extra = best
        choice[nm] = i
        spare -= extra
    if baseline is not None and params(baseline) <= target and loss(baseline) < loss(choice):
        choice = dict(baseline)
    return {nm: curves[nm][choice[nm]] for nm in names}
