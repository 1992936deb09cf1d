"""SVD pieces of a tall matrix ``X`` (many rows, few columns) seen only in ranges of rows, from
its Gram matrix ``XᵀX`` summed in float64 over the ranges (so a 49152 × 576 embedding's task
vectors never sit in memory whole). Pure tensor functions on the inputs' own device.

- :func:`right_singular`: ``(S, V)`` of ``X = U S Vᵀ`` from ``XᵀX = V S² Vᵀ`` (descending; the
  left vectors follow as ``U = X V S⁻¹``, range by range).
- :func:`inverse_sqrt`: ``C^{-1/2}`` of a positive semi-definite ``C`` (pseudo-inverse on its
  null space). For ``U`` with ``C = UᵀU``, ``U C^{-1/2}`` is the orthogonal polar factor
  ``P Qᵀ`` of ``U = P Σ Qᵀ``.

Squaring the matrix squares its condition number: singular values below ~1e-8 of the largest
lose their digits in float64 (far below what a float32 SVD resolves: ``max(m, n) · 1.2e-7``).
"""
from __future__ import annotations

import torch


def right_singular(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S [n], V [n, n])``, singular values descending, from ``XᵀX`` ``[n, n]``."""
    values, vectors = torch.linalg.eigh(gram.double())
    return values.flip(0).clamp(min=0).sqrt(), vectors.flip(1)


def inverse_sqrt(gram: torch.Tensor, rtol: float = 1e-12) -> torch.Tensor:
    """``C^{-1/2}`` (eigenvalues below ``rtol`` of the largest treated as 0)."""
    values, vectors = torch.linalg.eigh(gram.double())
    keep = values > rtol * values.max().clamp(min=0)
    scale = torch.where(keep, values.clamp(min=torch.finfo(values.dtype).tiny).rsqrt(), 0)
    return (vectors * scale) @ vectors.T
