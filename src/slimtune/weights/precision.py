"""The working precision of weight arithmetic (factorisations, residual bases, exports).

Every method computes in float32, or float64 when any input is float64, and stores its results in
the weight's own dtype: bf16/fp16 weights are never factorised in half precision.
"""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """``float64`` if any of ``tensors`` is float64, else ``float32``."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
