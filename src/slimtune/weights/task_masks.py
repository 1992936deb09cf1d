"""Per-entry scores and masks over stacked task vectors ``[k, d]`` (one row per task, a tensor's
entries flattened): PCB-Merging's balancing scores and TALL-masks / Consensus masks. Pure tensor
functions on the inputs' own device and dtype.

- :func:`minmax_normalize`: each row mapped to [0, 1] by ``(x − min) / (max − min)`` (0 for a
  constant row, where the PCB reference code divides 0 by 0).
- :func:`clamp_quantiles`: each row clamped between two of its own order statistics, indexed as
  the PCB reference code's ``clamp`` does (``int(d · low)`` and ``int(d · (1 − high) − 1)``).
- :func:`pcb_balancing`: PCB's ``(τ̃, β)``: the outlier-clamped task vectors and the
  intra × inter balancing scores.
- :func:`pcb_drop_scale`: PCB's drop + rescale weights: ``β`` below its row's ``(1 − ratio)``
  quantile set to the quantile, then :func:`minmax_normalize` (so they become 0).
- :func:`pcb_scores`, :func:`pcb_weights`: the same two from given order statistics, so they can
  be applied to ranges of a tensor's entries (:func:`pcb_statistic_indices` says which).
- :func:`tall_masks`: ``|τᵢ| > λᵢ · |τ_MTL − τᵢ|`` per task.
- :func:`consensus_mask`: the entries at least ``k`` task masks select.
"""
from __future__ import annotations

import torch


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """``[k, d]``: each row as ``(x − min) / (max − min)``; a row with ``max == min`` is 0."""
    low = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True) - low
    return torch.where(span > 0, (x - low) / torch.where(span > 0, span, 1), 0)


def order_statistic(x: torch.Tensor, index: int) -> torch.Tensor:
    """``[k, 1]``: the ``index``-th smallest entry (0-based) of each row of ``x`` ``[k, d]``,
    i.e. ``sort(x, dim=1)[:, index]`` (``index`` kept within ``[0, d − 1]``)."""
    index = min(max(index, 0), x.shape[1] - 1)
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values


def clamp_quantiles(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Each row of ``x`` ``[k, d]`` clamped to ``[sorted[int(d·low)], sorted[int(d·(1−high)−1)]]``
    (the PCB reference's ``clamp(x, min_ratio=low, max_ratio=high)``; ``high = 0`` leaves the
    top untouched)."""
    d = x.shape[1]
    return torch.clamp(x, order_statistic(x, int(d * low)),
                       order_statistic(x, int(d * (1 - high) - 1)))


def pcb_balancing(flat: torch.Tensor, outliers: float = 1e-4
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(τ̃, β)`` for task vectors ``flat`` ``[n, d]`` (PCB-Merging, Du et al. 2024, as in the
    authors' ``pcb-merging.py``):

        |τ̃ᵢ| = clamp_quantiles(|τᵢ|, outliers, outliers),  τ̃ᵢ = sign(τᵢ) |τ̃ᵢ|
        intra_i = exp(n · (minmax_normalize(|τ̃ᵢ|)² − 1))
        inter_i = tanh(τᵢ ⊙ Σⱼ τⱼ)
        βᵢ = intra_i ⊙ inter_i

    ``intra`` is the reference's ``exp(n · x²)`` times the constant ``e⁻ⁿ`` (it never overflows;
    :func:`pcb_drop_scale` is unchanged by a positive constant factor, as by the paper's softmax
    denominator)."""
    low_index, high_index, _ = pcb_statistic_indices(flat.shape[1], 1.0, outliers)
    size = flat.abs()
    return pcb_scores(flat, order_statistic(size, low_index), order_statistic(size, high_index))


def pcb_statistic_indices(d: int, ratio: float, outliers: float = 1e-4) -> tuple[int, int, int]:
    """The 0-based ranks (ascending) in a row of ``d`` entries of: the magnitude clamped up to,
    the magnitude clamped down to, and the score at which :func:`pcb_drop_scale` cuts."""
    def within(i: int) -> int:
        return min(max(i, 0), d - 1)
    return (within(int(d * outliers)), within(int(d * (1 - outliers) - 1)),
            within(int(d * (1 - ratio))))


def pcb_scores(flat: torch.Tensor, low: torch.Tensor, high: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pcb_balancing` of ``flat`` ``[n, d']`` (all tasks, any range of entries) given
    each task's magnitude order statistics ``low``, ``high`` ``[n, 1]`` over its whole row."""
    n = flat.shape[0]
    magnitude = torch.clamp(flat.abs(), low, high)
    clamped = flat.sign() * magnitude
    span = high - low
    normalized = torch.where(span > 0, (magnitude - low) / torch.where(span > 0, span, 1), 0)
    intra = torch.exp(n * (normalized ** 2 - 1))
    inter = torch.tanh(flat * flat.sum(dim=0, keepdim=True))
    return clamped, intra * inter


def pcb_drop_scale(beta: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[n, d]`` weights in [0, 1]: each row's scores at or below its ``int(d · (1 − ratio))``-th
    smallest become 0, the rest ``(β − β_thr) / (β_max − β_thr)`` (the reference's
    ``normalize(clamp(β, 1 − ratio, 0), dim=1)``)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    cut = pcb_statistic_indices(beta.shape[1], ratio)[2]
    return pcb_weights(beta, order_statistic(beta, cut), beta.amax(dim=1, keepdim=True))


def pcb_weights(beta: torch.Tensor, threshold: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """:func:`pcb_drop_scale` of ``beta`` ``[n, d']`` given each row's cut ``threshold`` and
    maximum ``top`` ``[n, 1]`` over its whole row."""
    span = top - threshold
    shifted = torch.clamp(beta, threshold, top) - threshold
    return torch.where(span > 0, shifted / torch.where(span > 0, span, 1), 0)


def tall_masks(stacked: torch.Tensor, multi: torch.Tensor,
               lambdas: torch.Tensor) -> torch.Tensor:
    """``[k, *shape]`` bool: TALL masks (Wang et al. 2024), ``mᵢ = |τᵢ| > λᵢ · |τ_MTL − τᵢ|``:
    the entries where the fine-tuned model ``θ₀ + τᵢ`` is farther (scaled by ``1/λᵢ``) from the
    base than from the multi-task model ``θ₀ + τ_MTL``. ``stacked``: the task vectors ``τᵢ``;
    ``multi``: ``τ_MTL`` ``[*shape]``; ``lambdas``: ``[k]``."""
    lam = lambdas.to(stacked.dtype).reshape(-1, *[1] * (stacked.dim() - 1))
    return stacked.abs() > lam * (multi - stacked).abs()


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    """``[*shape]`` bool: the entries selected by at least ``k`` of the task masks ``[n, *shape]``
    (Consensus Merging's support filter; ``k = 2`` drops the "selfish" and "catastrophic"
    weights, ``k > n`` keeps nothing)."""
    return masks.sum(dim=0) >= k
