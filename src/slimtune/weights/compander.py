"""A bounded, odd weight compander and its inverse (the weight compander hook's reparameterisation).

    w = f(v) = b·tanh(g·v / b),      v = f⁻¹(w) = (b / g)·atanh(w / b)   for |w| < b

``f`` is odd and increasing, ``|f(v)| < b`` for every ``v`` (it compresses large values towards the
bound) and ``f'(0) = g``: with ``g > 1`` small values are expanded away from zero (a step ``δv``
moves ``w`` by about ``g·δv`` near zero and by ``g·(1 − (w/b)²)·δv`` elsewhere). It is invertible
on ``(−b, b)``; :func:`bound_for` picks ``b`` as a multiple ``ratio > 1`` of a tensor's largest
magnitude so every entry of it is inside the range.
"""
from __future__ import annotations

import torch


def bound_for(w: torch.Tensor, ratio: float) -> float:
    """``ratio · max|w|`` (``ratio`` itself for an all-zero tensor); ``ratio`` must exceed 1."""
    if ratio <= 1:
        raise ValueError(f"ratio must exceed 1 (so every entry is invertible), got {ratio}")
    top = float(w.detach().abs().max()) if w.numel() else 0.0
    return ratio * top if top > 0 else float(ratio)


def compand(v: torch.Tensor, bound: float, gain: float) -> torch.Tensor:
    """``f(v) = bound·tanh(gain·v / bound)`` (differentiable; ``v``'s dtype)."""
    return bound * torch.tanh(v * (gain / bound))


def compand_inverse(w: torch.Tensor, bound: float, gain: float) -> torch.Tensor:
    """``f⁻¹(w) = (bound/gain)·atanh(w / bound)``, computed in float64 and returned in ``w``'s
    dtype; a ``ValueError`` when some ``|w| >= bound`` (outside ``f``'s range)."""
    x = w.detach().to(torch.float64) / bound
    if bool((x.abs() >= 1).any()):
        raise ValueError(f"|w| reaches the bound {bound:.4g}: the compander cannot represent it")
    return (torch.atanh(x) * (bound / gain)).to(w.dtype)
