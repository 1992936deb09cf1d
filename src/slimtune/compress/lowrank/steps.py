"""Shared low-rank machinery of the compression methods (not a method itself).

A method supplies one function, ``factorise(W, stats, rank) -> (U, S, Vh)``: its rank-``rank``
factorisation of the weight ``W [out, in]`` *in its own metric*, folded back so that
``U[:, :k] @ diag(S[:k]) @ Vh[:k]`` is the method's rank-``k`` approximation of ``W`` for every
``k <= rank`` (``rank=None``: all ``min(out, in)`` components, exact SVD). Everything else is here:

- :func:`factored_linear` turns the top-``k`` factors into the replacement module: a
  ``FactoredLinear`` with no base and ``LowRank(A [k, in], B [out, k], scale=1)`` plus the original
  bias, split *balanced*: ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) Vh_k``. It holds ``k*(out + in)``
  parameters (plus the bias) in the original weight's dtype and device.
- :class:`LowRankStep` -- a pipeline step with uniform allocation: every target gets
  ``k = rank_for_ratio(out, in, ratio)``.
- :class:`AllocatedLowRankStep` -- a two-pass pipeline step (``measure``, ``allocate``,
  ``apply``) for ``welore`` and ``sensitivity`` allocation (see :mod:`.allocation`), usable with
  any method because it only calls ``factorise``. ``measure`` sees the original model's
  statistics and keeps only small summaries (spectra or loss curves); ``apply`` factorises again
  on the statistics of the partly compressed model at the allocated rank.

Both steps compose (no inheritance between them or the methods) and keep ``report``:
``{name: {"rank": k or None (dense), "params": kept, "dense_params": out*in}}``, summarised by
:func:`summarise` (kept fraction, ranks, the targets left dense).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from slimtune.compress.lowrank.allocation import (
    allocate_by_loss, budget, kept_params, loss_curve, truncation_losses, welore_ranks)
from slimtune.layers import FactoredLinear, LowRank
from slimtune.weights.precision import all_finite
from slimtune.weights.svd import balanced_split, rank_for_ratio

Factorise = Callable[[Tensor, object, "int | None"], tuple[Tensor, Tensor, Tensor]]

DEFAULT_CANDIDATES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# -- reading layers and statistics ------------------------------------------------------------
def linear_parts(layer: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight [out, in], bias or None)`` of an ``nn.Linear`` or ``FactoredLinear``;
    ``ValueError`` for a weight holding NaN or Inf (no factorisation of it means anything)."""
    if isinstance(layer, (nn.Linear, FactoredLinear)):
        with torch.no_grad():
            W = (layer.weight if isinstance(layer, nn.Linear) else layer.dense_weight()).detach()
        if not all_finite(W):
            raise ValueError(f"a {tuple(W.shape)} weight to compress contains NaN or Inf")
        return W, None if layer.bias is None else layer.bias.detach()
    raise TypeError(f"low-rank compression applies to nn.Linear or FactoredLinear, got "
                    f"{type(layer).__name__}")


def input_gram(stats, method: str) -> Tensor:
    """``X^T X`` (summed over calibration tokens) from ``stats.inputs``."""
    inputs = getattr(stats, "inputs", None)
    if inputs is None or getattr(inputs, "gram_sum", None) is None:
        raise ValueError(f"{method}: needs the input Gram matrix X^T X (stats.inputs with a gram); "
                         "run it through the pipeline with needs={'gram'}")
    return inputs.gram()


def input_mean_abs(stats, method: str) -> Tensor:
    inputs = getattr(stats, "inputs", None)
    if inputs is None:
        raise ValueError(f"{method}: needs the inputs' mean |x| (stats.inputs)")
    return inputs.mean_abs()


def weight_fisher(stats, method: str) -> Tensor:
    fisher = getattr(stats, "fisher", None)
    if fisher is None:
        raise ValueError(f"{method}: needs the Fisher diagonal of the weight (stats.fisher)")
    return fisher


# -- factors -> module ------------------------------------------------------------------------
@torch.no_grad()
def factored_linear(U: Tensor, S: Tensor, Vh: Tensor, k: int, bias: Tensor | None,
                    dtype: torch.dtype, device: torch.device) -> FactoredLinear:
    """``FactoredLinear`` (no base) holding ``B = U_k sqrt(S_k)``, ``A = sqrt(S_k) Vh_k`` + bias."""
    if not 1 <= k <= S.numel():
        raise ValueError(f"rank {k} out of range for {S.numel()} components")
    A, B = balanced_split(U[:, :k], S[:k], Vh[:k])
    B = B.to(device=device, dtype=dtype).contiguous()
    A = A.to(device=device, dtype=dtype).contiguous()
    out_features, in_features = B.shape[0], A.shape[1]
    b = None if bias is None else bias.detach().to(device=device, dtype=dtype).clone()
    return FactoredLinear(in_features, out_features, lowrank=LowRank(A, B, scale=1.0), bias=b)


def _replace(factorise: Factorise, layer: nn.Module, stats, k: int) -> FactoredLinear:
    W, bias = linear_parts(layer)
    U, S, Vh = factorise(W, stats, k)
    return factored_linear(U, S, Vh, k, bias, W.dtype, W.device)


def summarise(report: dict[str, dict]) -> dict:
    """``{"kept_params", "dense_params", "kept_ratio", "ranks": {name: k}, "dense": [names]}``."""
    kept = sum(r["params"] for r in report.values())
    dense = sum(r["dense_params"] for r in report.values())
    return {"kept_params": kept, "dense_params": dense,
            "kept_ratio": kept / dense if dense else 1.0,
            "ranks": {n: r["rank"] for n, r in report.items()},
            "dense": [n for n, r in report.items() if r["rank"] is None]}


# -- pipeline steps ---------------------------------------------------------------------------
class LowRankStep:
    """Uniform allocation: each target becomes rank ``rank_for_ratio(out, in, ratio)``."""

    def __init__(self, method: str, targets, needs: frozenset[str], factorise: Factorise,
                 ratio: float):
        self.method, self.targets, self.needs = method, targets, frozenset(needs)
        self.factorise, self.ratio = factorise, ratio
        self.report: dict[str, dict] = {}

    def apply(self, name: str, layer: nn.Module, stats) -> nn.Module:
        W, _ = linear_parts(layer)
        m, n = W.shape
        k = min(rank_for_ratio(m, n, self.ratio), m, n)
        self.report[name] = {"rank": k, "params": k * (m + n), "dense_params": m * n}
        return _replace(self.factorise, layer, stats, k)

    def summary(self) -> dict:
        return summarise(self.report)

    def __repr__(self) -> str:
        return f"LowRankStep({self.method}, ratio={self.ratio}, allocation=uniform)"


class AllocatedLowRankStep:
    """Global rank allocation (``welore`` or ``sensitivity``) in two passes.

    ``measure`` (first pass, original model): factorise at full rank and keep the spectrum
    (welore) or the normalised loss curve at the candidate ratios (sensitivity, needs the Gram).
    ``allocate``: choose every target's rank (``None`` = stays dense) so the kept parameters are
    at most ``ratio`` of the targets' total. ``apply`` (second pass): factorise at that rank, or
    return the layer unchanged when it stays dense (listed in ``dense()``).
    """

    def __init__(self, method: str, targets, needs: frozenset[str], factorise: Factorise,
                 ratio: float, allocation: str, candidates=DEFAULT_CANDIDATES):
        if allocation not in ("welore", "sensitivity"):
            raise ValueError(f"allocation must be 'welore' or 'sensitivity', got {allocation!r}")
        if allocation == "sensitivity":
            needs = frozenset(needs) | {"gram"}
        self.method, self.targets, self.needs = method, targets, frozenset(needs)
        self.factorise, self.ratio, self.allocation = factorise, ratio, allocation
        self.candidates = tuple(sorted(set(float(c) for c in candidates) | {float(ratio)}))
        self.shapes: dict[str, tuple[int, int]] = {}
        self.spectra: dict[str, Tensor] = {}
        self.curves: dict = {}
        self.plan: dict[str, int | None] | None = None
        self.report: dict[str, dict] = {}

    @torch.no_grad()
    def measure(self, name: str, layer: nn.Module, stats) -> None:
        W, _ = linear_parts(layer)
        m, n = W.shape
        U, S, Vh = self.factorise(W, stats, None)
        self.shapes[name] = (m, n)
        if self.allocation == "welore":
            self.spectra[name] = S.detach().cpu()
        else:
            losses = truncation_losses(U, S, Vh, input_gram(stats, self.method))
            self.curves[name] = loss_curve(losses, m, n, self.candidates)

    def allocate(self) -> None:
        if not self.shapes:
            raise RuntimeError(f"{self.method} ({self.allocation}): allocate() before any "
                               "measure()")
        if self.allocation == "welore":
            self.plan = welore_ranks(self.spectra, self.shapes, self.ratio)
        else:
            uniform = {nm: next(i for i, p in enumerate(c) if p.ratio == float(self.ratio))
                       for nm, c in self.curves.items()}
            chosen = allocate_by_loss(self.curves, budget(self.shapes, self.ratio), uniform)
            self.plan = {nm: p.rank for nm, p in chosen.items()}
        for nm, k in self.plan.items():
            m, n = self.shapes[nm]
            self.report[nm] = {"rank": k, "params": kept_params(m, n, k), "dense_params": m * n}

    def dense(self) -> list[str]:
        """Targets the allocation leaves dense (their rank would not save parameters)."""
        return [nm for nm, k in (self.plan or {}).items() if k is None]

    def apply(self, name: str, layer: nn.Module, stats) -> nn.Module:
        if self.plan is None or name not in self.plan:
            raise RuntimeError(f"{self.method} ({self.allocation}): no rank allocated for {name}; "
                               "the measuring pass (measure for every target, then allocate) "
                               "must run first")
        k = self.plan[name]
        if k is None:
            return layer
        return _replace(self.factorise, layer, stats, k)

    def summary(self) -> dict:
        """The allocation (after ``allocate``): kept fraction, per-target ranks, dense targets."""
        return summarise(self.report)

    def __repr__(self) -> str:
        return (f"AllocatedLowRankStep({self.method}, ratio={self.ratio}, "
                f"allocation={self.allocation})")


def build_step(method: str, config, needs: frozenset[str], factorise: Factorise):
    """The step for ``config`` (fields ``targets``, ``ratio``, ``allocation``, ``candidates``)."""
    if config.allocation == "uniform":
        return LowRankStep(method, config.targets, needs, factorise, config.ratio)
    candidates = config.candidates if config.candidates is not None else DEFAULT_CANDIDATES
    return AllocatedLowRankStep(method, config.targets, needs, factorise, config.ratio,
                                config.allocation, candidates)
