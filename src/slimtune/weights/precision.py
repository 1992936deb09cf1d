"""The working precision of weight arithmetic (factorisations, residual bases, exports), and a
cheap finiteness check of its inputs.

Every method computes in float32, or float64 when any input is float64, and stores its results in
the weight's own dtype: bf16/fp16 weights are never factorised in half precision.
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """``float64`` if any of ``tensors`` is float64, else ``float32``."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, from one float64 sum (a NaN or Inf entry makes
    the sum NaN or Inf; the finite entries of a float32/half tensor cannot overflow it, those of
    a float64 tensor only if they are near 1e308). Much cheaper than ``isfinite(t).all()``."""
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))
