"""GPTQ and SparseGPT: the blocked Optimal-Brain-Surgeon column sweep over a layer Hessian.

Both methods fix the columns of ``W [out, in]`` one at a time, left to right, and push each
column's error onto the columns not yet fixed through the rows of ``U``, the upper Cholesky
factor of ``H⁻¹`` (:func:`slimtune.weights.hessian.inverse_cholesky`)::

    e = (w_j - ŵ_j) / U_jj,     W[:, j:] -= e · U[j, j:],     loss_j = Σ_rows e² / 2

in blocks of ``block_size`` columns with lazy batch updates of the later blocks
(``W[:, i2:] -= E · U[i1:i2, i2:]``), exactly as the reference codes.

- GPTQ (Frantar et al., 2022; LLaMA-7B 4-bit 6.09 / 3-bit 8.07 WikiText-2 perplexity vs 5.68
  dense): ``ŵ_j`` is ``w_j`` rounded on a grid FIXED before the solve from the original ``W``
  (:func:`slimtune.weights.quant.fit_grid`, per row and group, as llm-compressor does). With
  ``act_order`` the columns are swept in descending ``diag(H)`` but keep the grid of their
  NATURAL group (static groups); the results are returned in natural column order.
- SparseGPT (Frantar & Alistarh, 2023; OPT-175B at 50% sparsity with negligible perplexity
  increase): ``ŵ_j`` is ``w_j`` or 0 by a mask chosen with the OBS saliency ``w² / U_jj²`` on the
  CURRENT (already updated) weights: for unstructured sparsity over each whole column block
  (exactly ``floor(s·cum) - floor(s·prev)`` entries of it, so the layer total is
  ``floor(s·numel)``), for N:M within each group of M columns of every row.

``error`` is the sum of the OBS losses (the references' ``Losses.sum()``); since every step is
an exact OBS step of the quadratic, it equals ``tr(ΔW H_d ΔWᵀ) / 2`` with ``ΔW = W - Ŵ`` and
``H_d`` the damped Hessian actually used (``damp_used``). ``H`` and its Cholesky factor are
float64; the sweep runs in ``compute_dtype(W)`` (float32 for float32 and half weights, as the
references; float64 for float64 weights) on ``W``'s device, on ``Wᵀ`` so that every column is
one contiguous row (the per-column steps are small and their count, not their arithmetic, sets
the time). ``H`` is the UNDAMPED ``2G/n`` (:func:`slimtune.weights.hessian.layer_hessian`);
inputs with ``diag(H) = 0`` are dead and their columns are zeroed before the solve (see
:mod:`slimtune.weights.hessian`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from slimtune.weights.hessian import inverse_cholesky
from slimtune.weights.precision import compute_dtype
from slimtune.weights.quant import Grid, QuantSpec, dequantize, fit_grid, quantize
from slimtune.weights.sparsity import nm_mask, prune_count, prune_lowest

# (global column j, local column i, its row w of the block Wᵀ [width, out], the block, the
# block's U_jj² [width], out row) -> None: writes the fixed column ŵ_j into ``out``
ColumnRule = Callable[[int, int, Tensor, Tensor, Tensor, Tensor], None]
INNER_BLOCK = 32  # columns per per-column update span inside a block (see _sweep)


@dataclass
class GPTQResult:
    q: Tensor          # int32 [out, in], natural column order
    grid: Grid
    weight: Tensor     # dequantised [out, in] in compute_dtype(W)
    damp_used: float
    error: float


@dataclass
class SparseGPTResult:
    weight: Tensor     # [out, in] in compute_dtype(W), exactly 0 where mask is False
    mask: Tensor       # bool [out, in], True = kept
    damp_used: float
    error: float


def _prepare(W: Tensor, H: Tensor, block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(W in compute_dtype(W) with dead columns zeroed, H float64 on W's device, dead)``."""
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the {W.shape[1]} "
                         "inputs of the weight")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    H = H.detach().to(device=W.device, dtype=torch.float64)
    dead = torch.diagonal(H) == 0
    W = W.detach().to(compute_dtype(W)).clone()
    W[:, dead] = 0
    return W, H, dead


def _sweep(WT: Tensor, U: Tensor, block_size: int, rule: ColumnRule,
           inner: int = INNER_BLOCK) -> tuple[Tensor, float]:
    """The blocked OBS sweep over ``WT = Wᵀ [in, out]`` (consumed): ``(Ŵᵀ, Σ losses)``. Inside
    each block of ``block_size`` columns (what ``rule`` sees), the per-column updates reach only
    the next ``inner`` columns and the rest of the block is updated by one product per ``inner``
    columns: the same algebra as updating the whole block per column, with a fraction of the
    memory traffic (the per-column update is memory-bound). The rows of ``U`` are divided by
    their diagonal first, so the per-column step needs only ``w_j - ŵ_j`` (``e · U_jj``)."""
    cols = WT.shape[0]
    diag = torch.diagonal(U).to(WT.dtype)
    V = (U / torch.diagonal(U)[:, None]).to(WT.dtype)  # row j: U[j, :] / U_jj
    QT = torch.empty_like(WT)
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, V1 = WT[i1:i2], V[i1:i2, i1:i2]
        D1, dsq1 = torch.empty_like(W1), diag[i1:i2].square()  # D1 rows: w_j - ŵ_j
        w_rows, d_rows, q_rows = W1.unbind(0), D1.unbind(0), QT[i1:i2].unbind(0)
        for s1 in range(0, i2 - i1, inner):
            s2 = min(s1 + inner, i2 - i1)
            for i in range(s1, s2):
                rule(i1 + i, i, w_rows[i], W1, dsq1, q_rows[i])
                d = torch.sub(w_rows[i], q_rows[i], out=d_rows[i])
                if i + 1 < s2:
                    W1[i + 1:s2].addr_(V1[i, i + 1:s2], d, alpha=-1)
            if s2 < i2 - i1:
                W1[s2:].addmm_(V1[s1:s2, s2:].T, D1[s1:s2], alpha=-1)
        loss += float((D1 / diag[i1:i2, None]).square().sum()) / 2
        if i2 < cols:
            WT[i2:].addmm_(V[i1:i2, i2:].T, D1, alpha=-1)
    return QT, loss


@dataclass(frozen=True)
class HessianFactor:
    """What a sweep needs from one undamped ``H``: layers fed the same inputs can share it."""

    H: Tensor                # undamped float64 [in, in]
    perm: Tensor | None      # the act-order sweep order (descending diag(H)), None = natural
    U: Tensor                # upper Cholesky factor of (damped H, permuted by perm)⁻¹, float64
    damp_used: float


def hessian_factor(H: Tensor, damp: float = 0.01, act_order: bool = False,
                   device: torch.device | None = None) -> HessianFactor:
    """The :class:`HessianFactor` of the undamped ``H`` on ``device`` (default ``H``'s)."""
    H = H.detach().to(device=device or H.device, dtype=torch.float64)
    perm = None
    if act_order:
        perm = torch.sort(torch.diagonal(H), descending=True, stable=True).indices
    U, used = inverse_cholesky(H if perm is None else H[perm[:, None], perm], damp)
    return HessianFactor(H, perm, U, used)


def _factor(H: Tensor, damp: float, act_order: bool, device, factor: HessianFactor | None):
    if factor is None:
        return hessian_factor(H, damp, act_order, device)
    if (factor.perm is not None) != act_order or factor.H.shape != H.shape:
        raise ValueError("the given HessianFactor was made for another act_order or shape")
    return factor


def gptq(W: Tensor, H: Tensor, spec: QuantSpec, block_size: int = 128, act_order: bool = False,
         damp: float = 0.01, keep: Tensor | None = None,
         factor: HessianFactor | None = None) -> GPTQResult:
    """GPTQ of ``W [out, in]`` under the undamped Hessian ``H [in, in]`` (module docstring).
    ``keep`` (bool ``[out, in]``): entries outside it are pruned and quantised to exactly 0.
    ``factor``: :func:`hessian_factor` of this ``H`` (with this ``damp`` and ``act_order``),
    computed once for layers that share their inputs; made here when None."""
    if keep is not None and keep.shape != W.shape:
        raise ValueError(f"keep mask shape {tuple(keep.shape)} != weight {tuple(W.shape)}")
    Wc, H64, _ = _prepare(W, H, block_size)
    f = _factor(H64, damp, act_order, W.device, factor)
    cols = W.shape[1]
    g = spec.group_width(cols)
    grid = fit_grid(Wc, spec)  # dead columns already zero
    perm = torch.arange(cols, device=W.device) if f.perm is None else f.perm.to(W.device)
    # ŵ = clamp(round(w / s), q_min - z, q_max - z) · s is (clamp(round(w / s) + z) - z) · s
    # exactly (small integers), with (s, z) of the swept column's NATURAL group. Pruned entries
    # get the bounds [0, 0], so they are fixed at exactly 0.
    scale, zero = grid.scale.T.contiguous(), grid.zero.T.to(grid.scale.dtype)  # [groups, out]
    lo, hi = (spec.q_min - zero).contiguous(), (spec.q_max - zero).contiguous()
    group = perm // g
    scales, los, his = scale.unbind(0), lo.unbind(0), hi.unbind(0)  # one view per group
    swept = group.tolist()
    s_rows = [scales[k] for k in swept]
    if keep is None:
        lo_rows, hi_rows = [los[k] for k in swept], [his[k] for k in swept]
    else:
        kept = keep.to(W.device)[:, perm].T
        lo_rows, hi_rows = lo[group].where(kept, 0).unbind(0), hi[group].where(kept, 0).unbind(0)

    def rule(j: int, i: int, w: Tensor, W1: Tensor, dsq: Tensor, out: Tensor) -> None:
        s = s_rows[j]
        torch.div(w, s, out=out).round_().clamp_(lo_rows[j], hi_rows[j]).mul_(s)

    WT = (Wc if f.perm is None else Wc[:, perm]).T.contiguous()
    QT, error = _sweep(WT, f.U, block_size, rule)
    weight = (QT if f.perm is None else QT.index_select(0, torch.argsort(perm))).T  # natural
    q = quantize(weight, grid)  # exact: every entry of Ŵ lies on the grid
    return GPTQResult(q, grid, dequantize(q, grid, compute_dtype(W)), f.damp_used, error)


def sparsegpt(W: Tensor, H: Tensor, sparsity: float | None, pattern: tuple[int, int] | None = None,
              block_size: int = 128, damp: float = 0.01,
              factor: HessianFactor | None = None) -> SparseGPTResult:
    """SparseGPT of ``W [out, in]`` under the undamped Hessian ``H`` (module docstring):
    ``pattern=None`` prunes ``floor(sparsity · numel)`` entries, ``pattern=(n, m)`` keeps ``n``
    of every ``m`` consecutive inputs per row (``sparsity`` must then be None or ``1 - n/m``;
    ``m`` must divide ``block_size`` and ``in``). ``factor`` as for :func:`gptq` (natural
    order)."""
    Wc, H64, _ = _prepare(W, H, block_size)
    rows, cols = W.shape
    if pattern is None:
        prune_count(sparsity, 1)  # validates sparsity
    else:
        n, m = pattern
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"sparsity {sparsity} contradicts the {n}:{m} pattern "
                             f"({1 - n / m:g} sparse)")
        if cols % m or block_size % m:
            raise ValueError(f"M={m} must divide the {cols} inputs and block_size {block_size}")
    f = _factor(H64, damp, False, W.device, factor)
    maskT = torch.ones((cols, rows), dtype=torch.bool, device=W.device)  # [in, out], as Wᵀ
    zero = Wc.new_zeros(())

    def rule(j: int, i: int, w: Tensor, W1: Tensor, dsq: Tensor, out: Tensor) -> None:
        # saliencies are ranked as [out, in] matrices (.T views), so ties break as in sparsity.py
        if pattern is None and i == 0:
            width = W1.shape[0]
            k = prune_count(sparsity, (j + width) * rows) - prune_count(sparsity, j * rows)
            sal = W1.square() / dsq[:, None]
            maskT[j:j + width] = prune_lowest(sal.T, k).T
        elif pattern is not None and i % m == 0:
            sal = W1[i:i + m].square() / dsq[i:i + m, None]
            maskT[j:j + m] = nm_mask(sal.T, n, m).T
        torch.where(maskT[j], w, zero, out=out)

    inner = INNER_BLOCK if pattern is None else m * max(1, INNER_BLOCK // m)  # whole N:M groups
    QT, error = _sweep(Wc.T.contiguous(), f.U, block_size, rule, inner)
    mask = maskT.T.contiguous()
    return SparseGPTResult(QT.T.contiguous(), mask, f.damp_used, error)
