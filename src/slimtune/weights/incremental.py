"""Incremental PCA: the top-``k`` principal components of a stream of row batches.

The classic incremental SVD (Ross et al. 2008, "Incremental Learning for Robust Visual Tracking";
the scheme of scikit-learn's ``IncrementalPCA``): after ``n`` rows the state is the mean ``mu``,
the top-``k`` singular values ``S`` and right singular vectors ``V`` (``[k, d]``) of the centred
data seen so far, and the total sum of squared deviations. A batch ``X`` (``[m, d]``, mean
``mu_b``) is folded in by one SVD of the stacked matrix

    [ diag(S)·V ;  X - mu_b ;  sqrt(n·m/(n+m))·(mu - mu_b) ]

whose Gram matrix is the centred scatter matrix of all ``n + m`` rows, except that the old part is
replaced by its rank-``k`` truncation (so with ``k >= rank`` the result is exact, and otherwise the
top components are an approximation that improves with the spectral gap at ``k``). Memory is
``k × d`` plus one batch. The total variance is tracked exactly (a scalar), so
``explained_variance_ratio`` is ``S² / total`` over all rows seen.

Signs are deterministic: each component is flipped so its largest-magnitude entry is positive, so
consecutive estimates can be compared by cosine similarity (EVA's convergence test).
"""
from __future__ import annotations

import math

import torch

from slimtune.weights.svd import randomized_svd


def fix_component_signs(V: torch.Tensor) -> torch.Tensor:
    """Rows of ``V`` flipped so that each row's largest-|.| entry is positive."""
    peaks = V.gather(1, V.abs().argmax(dim=1, keepdim=True))
    return V * torch.where(peaks < 0, -1.0, 1.0).to(V.dtype)


class IncrementalPCA:
    """Running top-``n_components`` PCA of row batches (see the module docstring).

    Holds ``min(n_components, d, rows seen)`` components: batches smaller than ``n_components``
    are fine (nothing is truncated until more rows than components have been seen).

    ``method="exact"`` takes a full SVD of each stacked matrix; ``"randomized"`` the top-``k``
    randomized SVD of :func:`slimtune.weights.svd.randomized_svd` with ``k`` extra sketch columns
    (``q = 2k``, as PEFT's EVA) and ``n_iter`` power iterations, seeded. Computes in float32, or
    float64 when ``dtype=torch.float64``; the mean and the total variance are kept in float64.
    """

    def __init__(self, n_components: int, method: str = "exact", n_iter: int = 4, seed: int = 0,
                 dtype: torch.dtype = torch.float32):
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}")
        if method not in ("exact", "randomized"):
            raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.k, self.method, self.n_iter, self.seed, self.dtype = (n_components, method, n_iter,
                                                                    seed, dtype)
        self.n_seen = 0
        self.mean: torch.Tensor | None = None  # [d] float64
        self.total_ss = 0.0  # sum of squared deviations from the mean, all features
        self.components: torch.Tensor | None = None  # [k, d]
        self.singular_values: torch.Tensor | None = None  # [k]

    @torch.no_grad()
    def update(self, X: torch.Tensor) -> None:
        """Fold in a batch ``X`` ``[m, d]`` (any ``m >= 1``)."""
        if X.ndim != 2:
            raise ValueError(f"expected a 2-D batch [rows, features], got shape {tuple(X.shape)}")
        m, d = X.shape
        if self.mean is not None and d != self.mean.numel():
            raise ValueError(f"expected {self.mean.numel()} features, got {d}")
        X = X.detach().to(self.dtype)
        batch_mean = X.mean(dim=0, dtype=torch.float64)
        Xc = X - batch_mean.to(self.dtype)
        batch_ss = float(Xc.double().square().sum())
        if self.components is None:
            stacked = Xc
            self.mean, self.n_seen, self.total_ss = batch_mean, m, batch_ss
        else:
            n = self.n_seen
            shift = self.mean - batch_mean
            weight = n * m / (n + m)
            correction = (math.sqrt(weight) * shift).to(self.dtype)[None]
            stacked = torch.cat([self.singular_values[:, None] * self.components, Xc, correction])
            self.total_ss += batch_ss + weight * float(shift.square().sum())
            self.mean = (n * self.mean + m * batch_mean) / (n + m)
            self.n_seen = n + m
        if self.method == "exact":
            _, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
        else:
            _, S, Vh = randomized_svd(stacked, min(self.k, *stacked.shape), oversample=self.k,
                                      n_iter=self.n_iter, seed=self.seed)
        self.singular_values = S[:self.k].clone()
        self.components = fix_component_signs(Vh[:self.k])

    @property
    def explained_variance(self) -> torch.Tensor:
        """Variance along each component, ``S² / (n - 1)``."""
        return self.singular_values.double().square() / max(self.n_seen - 1, 1)

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        """Share of the total variance along each component, ``S² / sum of squared deviations``."""
        return self.singular_values.double().square() / max(self.total_ss, 1e-300)
