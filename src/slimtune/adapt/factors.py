"""Shared building blocks of the adapter methods (not a method itself).

:func:`adapted_linear` turns an ``nn.Linear`` and initial factors ``B [out, r]``, ``A [r, in]``
(optional core ``K``) into the ``FactoredLinear`` every method in this package returns::

    y = x·W_baseᵀ + s·((x·Aᵀ)·Kᵀ)·Bᵀ + bias,    W_base = W - s·B·K·A   (residual=True)

With ``residual=True`` (PiSSA, MiLoRA, OLoRA, CorDA, SVFit, SORSA) the base is the original weight
minus the initial low-rank product, so the layer's output at step 0 equals the original's up to
float round-off, and a frozen copy of the initial factors is kept as the layer's ``origin`` (saved
with the adapter, so :func:`slimtune.adapt.load` rebuilds the base from a fresh model without
redoing the SVD, and used to export a plain LoRA). With ``residual=False`` (LoRA, DoRA, EVA: one
factor starts at zero) the original weight is the base, shared rather than copied.

Factor arithmetic runs in float32 (float64 for float64 weights); tensors are stored in the weight's
dtype on its device.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slimtune.layers import DenseBase, FactoredLinear, LowRank
from slimtune.weights.precision import compute_dtype
from slimtune.weights.svd import gram_svd, randomized_svd, truncated_svd


def init_weight(linear: nn.Linear, r: int, method: str) -> Tensor:
    """The layer's weight in the compute dtype, after checking ``r <= min(out, in)``."""
    W = linear.weight.detach().to(compute_dtype(linear.weight))
    if r > min(W.shape):
        raise ValueError(f"{method}: r={r} exceeds min(out, in) = {min(W.shape)}")
    return W


def top_singular(linear: nn.Linear, r: int, method: str, svd: str = "randomized", niter: int = 4,
                 oversample: int = 10, seed: int = 0):
    """``(U_r, S_r, Vh_r)`` of the layer's weight by the named route of ``slimtune.weights.svd``:
    ``exact`` (LAPACK), ``gram`` (eigh of the float64 Gram matrix) or ``randomized``."""
    W = init_weight(linear, r, method)
    if svd == "exact":
        return truncated_svd(W, r)
    if svd == "gram":
        return gram_svd(W, r)
    return randomized_svd(W, r, oversample=oversample, n_iter=niter, seed=seed)


def layer_generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from ``(seed, name)``: every layer gets its own reproducible stream,
    independent of the order in which layers are initialised."""
    digest = sum((i + 1) * ord(c) for i, c in enumerate(name)) % (2 ** 31)
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + digest)
    return g


def kaiming_uniform_A(r: int, n_in: int, generator: torch.Generator, dtype: torch.dtype,
                      device) -> Tensor:
    """``U(-1/sqrt(in), 1/sqrt(in))``: LoRA's (and ``nn.Linear``'s) ``kaiming_uniform_(a=sqrt(5))``
    for a ``[r, in]`` matrix, drawn from ``generator``."""
    bound = 1.0 / math.sqrt(n_in)
    A = torch.empty(r, n_in, dtype=dtype, device=device)
    return A.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def adapted_linear(linear: nn.Linear, A: Tensor, B: Tensor, scale: float, *,
                   core: Tensor | None = None, residual: bool = False,
                   train_A: bool = True, train_B: bool = True, train_core: bool = True,
                   transform: nn.Module | None = None) -> FactoredLinear:
    """The adapted layer for ``linear`` (see the module docstring)."""
    W = linear.weight
    if A.shape[1] != linear.in_features or B.shape[0] != linear.out_features:
        raise ValueError(f"factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit a linear "
                         f"{linear.out_features}x{linear.in_features}")
    kw = {"dtype": W.dtype, "device": W.device}
    A, B = A.to(**kw).contiguous(), B.to(**kw).contiguous()
    core = None if core is None else core.to(**kw).contiguous()
    lowrank = LowRank(A.clone(), B.clone(), scale, None if core is None else core.clone(),
                      train_A=train_A, train_B=train_B, train_core=train_core)
    origin = None
    if residual:
        origin = LowRank(A, B, scale, core, train_A=False, train_B=False, train_core=False)
        dtype = compute_dtype(W)
        base_weight = (W.to(dtype) - origin.delta_weight().to(dtype)).to(W.dtype)
        base = DenseBase(base_weight)
    else:
        base = DenseBase(W.data)
    bias = None if linear.bias is None else linear.bias.data
    return FactoredLinear(linear.in_features, linear.out_features, base=base, lowrank=lowrank,
                          bias=bias, transform=transform, origin=origin)


@torch.no_grad()
def reset_optimizer_entries(optimizer, param: nn.Parameter, slots: Tensor) -> None:
    """Zero, at ``slots``, every state tensor shaped like ``param`` (Adam's moments, SGD's
    momentum) that ``optimizer`` keeps for it -- or the base optimiser a wrapper (SAM) steps:
    re-selected entries of a sparse part start afresh. ``optimizer`` None: nothing to reset."""
    while optimizer is not None:
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value[slots] = 0
        optimizer = getattr(optimizer, "base", None)
