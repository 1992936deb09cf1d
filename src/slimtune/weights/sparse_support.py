"""Supports of sparse weight updates: which entries of an ``out x in`` weight a sparse delta
trains (flat row-major indices), and how a support of fixed size ``k`` changes during training.

- :func:`support_size` / :func:`check_support_size` -- ``k = ⌊fraction·out·in⌋``, and the error
  for a fraction that keeps no entry of a layer.
- :func:`random_support` -- ``k`` distinct positions uniformly at random, sorted.
- :func:`extreme_entries` -- exactly the ``k`` largest (or smallest) entries of a score tensor,
  ties broken by position (the lower flat index is taken first), sorted.
- :func:`assign_support` -- a new support of the same size put into the slots of the old one: a
  position in both keeps its slot, the other slots take the new positions in ascending order, so
  a trainable value vector (and its optimiser state) stays aligned with the unchanged entries.
- :func:`drop_and_regrow` -- one dynamic-sparsity step (RigL, SpIEL): drop the ``n`` slots with
  the lowest keep score, regrow ``n`` positions outside the remaining support with the highest
  grow score; a dropped position that is regrown keeps its slot.
- :func:`sparse_outliers` -- the support of ``S`` in a low-rank plus sparse split ``W ≈ L + S``
  (GoDec, Zhou & Tao 2011, with a cardinality constraint): ``L`` the rank-``q`` SVD of ``W - S``,
  ``S`` the ``nnz`` largest-magnitude entries of ``W - L``, alternated from ``S = 0``.

Scores are compared in float32 (float64 for float64 input). Every function returns new tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.weights.precision import compute_dtype
from slimtune.weights.svd import randomized_svd


def support_size(fraction: float, n_out: int, n_in: int) -> int:
    """``⌊fraction·out·in⌋`` entries (as SLTrain's and SpIEL's reference code count them)."""
    return int(fraction * n_out * n_in)


def check_support_size(method: str, key: str, fraction: float, name: str,
                       shape: tuple[int, int]) -> None:
    """``ValueError`` when ``fraction`` of an ``out x in`` layer ``name`` keeps no entry."""
    if support_size(fraction, *shape) < 1:
        raise ValueError(f"{method}: {key}={fraction:g} keeps no entry of {name} "
                         f"({shape[0]}x{shape[1]}); raise {key}")


def random_support(numel: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct flat indices in ``[0, numel)``, uniform at random from ``generator``,
    sorted."""
    if not 0 <= k <= numel:
        raise ValueError(f"cannot choose {k} of {numel} positions")
    return torch.randperm(numel, generator=generator)[:k].sort().values


def extreme_entries(scores: Tensor, k: int, largest: bool = True) -> Tensor:
    """The flat indices of exactly the ``k`` largest (``largest=False``: smallest) entries of
    ``scores``, sorted; among equal scores the lower index is taken first."""
    flat = scores.detach().reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"cannot choose {k} of {flat.numel()} entries")
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    key = flat.to(compute_dtype(flat))
    key = -key if largest else key
    t = torch.kthvalue(key, k).values  # linear-time selection, not a sort
    chosen = torch.nonzero(key < t).squeeze(1)
    ties = torch.nonzero(key == t).squeeze(1)
    return torch.cat([chosen, ties[:k - chosen.numel()]]).sort().values


def assign_support(indices: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
    """``(new indices, changed slots)``: ``support`` (as many distinct positions as
    ``indices``) laid into the slots of ``indices`` (see the module docstring); the changed slots
    are sorted."""
    if support.numel() != indices.numel():
        raise ValueError(f"a support of {support.numel()} positions does not fit "
                         f"{indices.numel()} slots")
    support = support.to(indices.device, indices.dtype)
    changed = torch.nonzero(~torch.isin(indices, support)).squeeze(1)
    incoming = support[~torch.isin(support, indices)].sort().values
    new = indices.clone()
    new[changed] = incoming
    return new, changed


def drop_and_regrow(indices: Tensor, keep: Tensor, grow: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """``(new indices, changed slots)`` after dropping the ``n`` slots with the lowest ``keep``
    score (``[k]``; ties: the lower slot first) and regrowing the ``n`` positions with the highest
    ``grow`` score (flat ``[numel]``) outside the remaining support. A dropped position that is
    regrown keeps its slot (it is not changed); the changed slots are sorted."""
    k = indices.numel()
    if not 0 <= n <= k:
        raise ValueError(f"cannot drop {n} of {k} entries")
    if keep.shape != indices.shape:
        raise ValueError(f"keep scores {tuple(keep.shape)} do not match {k} slots")
    if n == 0:
        return indices.clone(), indices.new_zeros(0)
    dropped = extreme_entries(keep, n, largest=False).to(indices.device)
    remaining = torch.ones(k, dtype=torch.bool, device=indices.device)
    remaining[dropped] = False
    score = grow.detach().reshape(-1).to(compute_dtype(grow)).clone()
    score[indices[remaining]] = -torch.inf
    grown = extreme_entries(score, n, largest=True).to(indices.device)
    outgoing = indices[dropped]
    changed = dropped[~torch.isin(outgoing, grown)].sort().values
    new = indices.clone()
    new[changed] = grown[~torch.isin(grown, outgoing)]
    return new, changed


def sparse_outliers(W: Tensor, nnz: int, rank: int, iters: int = 2, seed: int = 0) -> Tensor:
    """The sorted flat support of ``S`` in ``W ≈ L + S`` (see the module docstring); the SVDs
    are randomized (:func:`slimtune.weights.svd.randomized_svd`, seeded by ``seed``). With
    ``rank = 0`` it is the ``nnz`` largest ``|W|``."""
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not 0 <= rank <= min(W.shape):
        raise ValueError(f"rank {rank} does not fit a {W.shape[0]}x{W.shape[1]} weight")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    W = W.detach().to(compute_dtype(W))
    if rank == 0:
        return extreme_entries(W.abs(), nnz)
    S = torch.zeros_like(W)
    for _ in range(iters):
        U, sigma, Vh = randomized_svd(W - S, rank, seed=seed)
        residual = W - (U * sigma) @ Vh
        support = extreme_entries(residual.abs(), nnz)
        S = torch.zeros_like(W).view(-1).index_copy_(0, support, residual.view(-1)[support])
        S = S.view_as(W)
    return support
