"""Task-vector math for model merging: trimming, random dropping, sign election, disjoint sums.

A task vector is τᵢ = Wᵢ − W_base for one tensor; the merge methods in :mod:`slimtune.merge`
combine the τᵢ of k tasks, stacked as ``[k, *shape]``. Pure tensor functions, on the tensors'
own device and dtype:

- :func:`keep_top_magnitude`: TIES's trim (Yadav et al. 2023): the ``int(density · numel)``
  entries of largest ``|τ|`` are kept, the rest set to zero (entries tied in magnitude at the
  threshold chosen by the lowest index, or in a peer's order).
- :func:`keep_magnitude_band`: Model Breadcrumbs' mask: the largest ``gamma`` and the smallest
  entries dropped, ``density`` of them kept.
- :func:`bernoulli_mask`: DARE's drop (Yu et al. 2024): each entry kept with probability
  ``density``, from a seeded generator.
- :func:`rescale_kept`: after a random drop, ``inverse`` divides by ``density`` (the DARE
  paper: the expectation is unchanged); ``l1`` scales the kept entries so their L1 norm equals
  the undropped τ's (mergekit's ``rescale``).
- :func:`elect_sign`: one sign per entry, ``+1`` where the sum over tasks (``total``: of the
  values; ``frequency``: of their signs) is ``>= 0``, else ``-1``.
- :func:`disjoint_sum`: the entries agreeing with the elected sign (zeros never agree), summed
  over tasks and divided by ``divisor`` (at least 1 where nothing agrees, as 0/1 = 0).
"""
from __future__ import annotations

from typing import Literal

import torch

from slimtune.weights.magnitude_threshold import top_magnitude_mask

TieOrder = Literal["index", "topk", "argsort"]


def keep_top_magnitude(t: torch.Tensor, density: float, order: TieOrder = "index",
                       at_least_one: bool = False) -> torch.Tensor:
    """``t`` with all but its ``int(density · numel)`` largest-magnitude entries set to zero
    (at least one with ``at_least_one``, as mergekit).

    Entries of equal magnitude at the threshold are chosen by the lowest flat index
    (``order="index"``: the same whole or streamed in pieces,
    :class:`~slimtune.weights.magnitude_threshold.TopMagnitudeMask`), as PEFT does
    (``"topk"``: ``torch.topk``) or as mergekit does (``"argsort"``: the first k of a
    descending ``torch.argsort``, and at least one entry). Real weights (SmolLM2's are
    dequantised 4-bit values) have such ties, so exact parity with a peer needs its order; the
    peers' orders come from unstable sorts of the whole tensor."""
    if not 0 <= density <= 1:
        raise ValueError(f"density must be in [0, 1], got {density}")
    if order not in ("index", "topk", "argsort"):
        raise ValueError(f"order must be 'index', 'topk' or 'argsort', got {order!r}")
    k = int(density * t.numel())
    flat = t.reshape(-1)
    k_kept = max(1, k) if order == "argsort" or at_least_one else k
    if order == "index":
        return t * top_magnitude_mask(t, min(k_kept, flat.numel()))
    if 0 < k_kept < flat.numel():
        # the k-th largest magnitude by selection, O(n); exact unless a non-zero tie straddles
        # it (then only the peer's sort order says which tied entries are kept)
        size = flat.abs().float()
        kth = torch.kthvalue(size, flat.numel() - k_kept + 1).values
        kept = size >= kth
        if kth == 0 or int(kept.sum()) == k_kept:
            return t * kept.reshape(t.shape)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if order == "topk":
        mask[torch.topk(flat.abs(), k=k, largest=True).indices] = True
    else:
        mask[torch.argsort(flat.abs().float(), descending=True)[:k_kept]] = True
    return t * mask.reshape(t.shape)


def band_sizes(n: int, density: float, gamma: float) -> tuple[int, int]:
    """``(outliers, keep)``: Breadcrumbs drops the ``outliers`` largest magnitudes of ``n`` and
    keeps the next ``keep`` (fewer outliers when both cannot hold)."""
    keep = int(density * n)
    return n - keep - max(0, n - keep - int(gamma * n)), keep


def keep_magnitude_band(t: torch.Tensor, density: float, gamma: float,
                        order: Literal["index", "sort"] = "index") -> torch.Tensor:
    """Model Breadcrumbs' mask (Davari & Belilovsky 2023): drop the ``int(gamma · numel)``
    largest-magnitude entries (outliers) and then the smallest, keeping ``int(density · numel)``
    entries (fewer outliers are dropped when both cannot hold). Ties in magnitude are ordered by
    the lowest index first (``"index"``) or as mergekit orders them (``"sort"``: an ascending
    ``torch.sort``)."""
    if not 0 < density <= 1 or not 0 <= gamma < 1:
        raise ValueError(f"need density in (0, 1] and gamma in [0, 1), got {density}, {gamma}")
    if order not in ("index", "sort"):
        raise ValueError(f"order must be 'index' or 'sort', got {order!r}")
    if density >= 1:
        return t.clone()
    n = t.numel()
    top, keep = band_sizes(n, density, gamma)
    if order == "index":
        return t * (top_magnitude_mask(t, top + keep) & ~top_magnitude_mask(t, top))
    bottom = n - keep - top
    order = torch.sort(t.reshape(-1).abs().float(), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=t.device)
    mask[order[bottom:bottom + keep]] = True
    return t * mask.reshape(t.shape)


def bernoulli_mask(t: torch.Tensor, density: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """A {0, 1} mask shaped and typed like ``t``, each entry 1 with probability ``density``
    (``torch.bernoulli``; with the default generator when ``generator`` is None)."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return torch.bernoulli(torch.full_like(t, density), generator=generator)


def rescale_kept(t: torch.Tensor, kept: torch.Tensor, density: float,
                 how: Literal["inverse", "l1"]) -> torch.Tensor:
    """``kept`` (``t`` after a random drop) rescaled: ``inverse``: / density; ``l1``: × ‖t‖₁ /
    ‖kept‖₁ (unchanged where nothing was kept)."""
    if how == "inverse":
        return kept / density
    if how == "l1":  # the norms summed in float64: the same whole or over pieces
        norm = float(kept.abs().double().sum())
        return kept * (float(t.abs().double().sum()) / norm) if norm > 0 else kept
    raise ValueError(f"rescale must be 'inverse' or 'l1', got {how!r}")


def elect_sign(stacked: torch.Tensor,
               method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """``[*shape]`` of ±1: the sign of the sum over dim 0 of the values (``total``) or of their
    signs (``frequency``); a zero sum elects +1."""
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = stacked.sign().sum(dim=0)
    else:
        raise ValueError(f"majority must be 'total' or 'frequency', got {method!r}")
    return torch.where(mass >= 0, 1, -1).to(stacked.dtype)


def agreeing(stacked: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``[k, *shape]`` bool: the entries whose sign is the elected one (zeros never are)."""
    return stacked.sign() == sign


def disjoint_sum(values: torch.Tensor, agree: torch.Tensor,
                 divisor: torch.Tensor | None = None) -> torch.Tensor:
    """Σₖ values·agree / max(divisor, 1 where it is 0); ``divisor`` None: the count of agreeing
    tasks per entry (TIES's disjoint mean)."""
    total = (values * agree).sum(dim=0)
    if divisor is None:
        divisor = agree.sum(dim=0).to(values.dtype)
    return total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def elect_and_merge(trimmed: torch.Tensor, weights: torch.Tensor,
                    majority: Literal["total", "frequency"] = "total",
                    convention: Literal["mergekit", "peft"] = "mergekit",
                    normalize: bool = True) -> torch.Tensor:
    """TIES's elect + disjoint merge of ``trimmed`` task vectors ``[k, *shape]`` with weights
    ``[k, 1, ...]``. ``peft`` (PEFT's ``ties``): the sign is elected on the unweighted vectors
    and the agreeing weighted entries are divided by their count; ``mergekit``: the sign is
    elected on the weighted vectors and their agreeing entries are divided by the sum of the
    agreeing weights. The two agree for unit weights. ``normalize=False``: no division (the
    agreeing weighted entries are summed; mergekit's default for ``dare_ties``)."""
    if convention not in ("mergekit", "peft"):
        raise ValueError(f"convention must be 'mergekit' or 'peft', got {convention!r}")
    weighted = trimmed * weights
    voters = trimmed if convention == "peft" else weighted
    agree = agreeing(voters, elect_sign(voters, majority))
    if not normalize:
        return (weighted * agree).sum(dim=0)
    if convention == "peft":
        return disjoint_sum(weighted, agree)
    return disjoint_sum(weighted, agree, (weights * agree).sum(dim=0))
