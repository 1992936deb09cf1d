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
``H_d`` the damped Hessian actually used (``damp_used``). The sweep is float64 on ``W``'s device
(float64 must be supported there; the references sweep in float32); outputs are in
``compute_dtype(W)``. ``H`` is the UNDAMPED
``2G/n`` (:func:`slimtune.weights.hessian.layer_hessian`); inputs with ``diag(H) = 0`` are dead
and their columns are zeroed before the solve (see :mod:`slimtune.weights.hessian`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from slimtune.weights.hessian import inverse_cholesky
from slimtune.weights.precision import compute_dtype
from slimtune.weights.quant import (Grid, QuantSpec, dequantize, dequantize_values, fit_grid,
                                    quantize_values)
from slimtune.weights.sparsity import nm_mask, prune_count, prune_lowest

# (global column j, local column i, block W1 [out, width], block U1) -> the fixed column ŵ_j
ColumnRule = Callable[[int, int, Tensor, Tensor], Tensor]
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
    """``(W float64 with dead columns zeroed, H float64 on W's device, dead)``."""
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match the {W.shape[1]} "
                         "inputs of the weight")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    H = H.detach().to(device=W.device, dtype=torch.float64)
    dead = torch.diagonal(H) == 0
    W = W.detach().to(torch.float64).clone()
    W[:, dead] = 0
    return W, H, dead


def _sweep(W: Tensor, U: Tensor, block_size: int, rule: ColumnRule,
           inner: int = INNER_BLOCK) -> tuple[Tensor, float]:
    """The blocked OBS sweep: ``(Ŵ, Σ losses)``; ``W`` is consumed. Inside each block
    of ``block_size`` columns (what ``rule`` sees), the per-column updates reach only the next
    ``inner`` columns and the rest of the block is updated by one product per ``inner`` columns:
    the same algebra as updating the whole block per column, with a fraction of the memory
    traffic (the per-column update is memory-bound)."""
    cols = W.shape[1]
    Q = torch.zeros_like(W)
    loss = W.new_zeros(())
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for s1 in range(0, i2 - i1, inner):
            s2 = min(s1 + inner, i2 - i1)
            for i in range(s1, s2):
                q = rule(i1 + i, i, W1, U1)
                e = (W1[:, i] - q) / U1[i, i]
                W1[:, i:s2].addr_(e, U1[i, i:s2], alpha=-1)
                Q[:, i1 + i], E1[:, i] = q, e
            W1[:, s2:] -= E1[:, s1:s2] @ U1[s1:s2, s2:]
        loss += E1.square().sum() / 2
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q, float(loss)


def gptq(W: Tensor, H: Tensor, spec: QuantSpec, block_size: int = 128, act_order: bool = False,
         damp: float = 0.01, keep: Tensor | None = None) -> GPTQResult:
    """GPTQ of ``W [out, in]`` under the undamped Hessian ``H [in, in]`` (module docstring).
    ``keep`` (bool ``[out, in]``): entries outside it are pruned and quantised to exactly 0."""
    if keep is not None and keep.shape != W.shape:
        raise ValueError(f"keep mask shape {tuple(keep.shape)} != weight {tuple(W.shape)}")
    out_dtype = compute_dtype(W)
    W64, H64, dead = _prepare(W, H, block_size)
    g = spec.group_width(W.shape[1])
    grid = fit_grid(W64.to(out_dtype), spec)  # dead columns already zero
    perm = torch.arange(W.shape[1], device=W.device)
    if act_order:
        perm = torch.sort(torch.diagonal(H64), descending=True, stable=True).indices
    U, used = inverse_cholesky(H64[perm][:, perm], damp)
    # the (scale, zero) of every swept position, from its natural group
    scale = grid.scale[:, perm // g]
    zero = grid.zero.to(scale.dtype)[:, perm // g]
    kept = None if keep is None else keep.to(W.device)[:, perm]
    q_swept = torch.zeros(W.shape, dtype=scale.dtype, device=W.device)  # integers, as floats

    def rule(j: int, i: int, W1: Tensor, U1: Tensor) -> Tensor:
        s, z = scale[:, j], zero[:, j]
        qj = quantize_values(W1[:, i].to(s.dtype), s, z, spec)
        if kept is not None:
            qj = torch.where(kept[:, j], qj, z)
        q_swept[:, j] = qj
        return dequantize_values(qj, s, z).to(W1.dtype)

    _, error = _sweep(W64[:, perm], U, block_size, rule)
    q = torch.empty(W.shape, dtype=torch.int32, device=W.device)
    q[:, perm] = q_swept.to(torch.int32)
    return GPTQResult(q, grid, dequantize(q, grid, out_dtype), used, error)


def sparsegpt(W: Tensor, H: Tensor, sparsity: float | None, pattern: tuple[int, int] | None = None,
              block_size: int = 128, damp: float = 0.01) -> SparseGPTResult:
    """SparseGPT of ``W [out, in]`` under the undamped Hessian ``H`` (module docstring):
    ``pattern=None`` prunes ``floor(sparsity · numel)`` entries, ``pattern=(n, m)`` keeps ``n``
    of every ``m`` consecutive inputs per row (``sparsity`` must then be None or ``1 - n/m``;
    ``m`` must divide ``block_size`` and ``in``)."""
    out_dtype = compute_dtype(W)
    W64, H64, _ = _prepare(W, H, block_size)
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
    U, used = inverse_cholesky(H64, damp)
    mask = torch.ones(W.shape, dtype=torch.bool, device=W.device)

    def rule(j: int, i: int, W1: Tensor, U1: Tensor) -> Tensor:
        if pattern is None and i == 0:
            width = W1.shape[1]
            k = prune_count(sparsity, (j + width) * rows) - prune_count(sparsity, j * rows)
            mask[:, j:j + width] = prune_lowest(W1.square() / torch.diagonal(U1).square(), k)
        elif pattern is not None and i % m == 0:
            sal = W1[:, i:i + m].square() / torch.diagonal(U1)[i:i + m].square()
            mask[:, j:j + m] = nm_mask(sal, n, m)
        return torch.where(mask[:, j], W1[:, i], torch.zeros_like(W1[:, i]))

    inner = INNER_BLOCK if pattern is None else m * max(1, INNER_BLOCK // m)  # whole N:M groups
    Q, error = _sweep(W64, U, block_size, rule, inner)
    return SparseGPTResult(Q.to(out_dtype), mask, used, error)
