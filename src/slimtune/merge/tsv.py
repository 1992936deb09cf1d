"""TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
Merging", CVPR 2025): compress each task's layer update to its top singular vectors, then remove
the interference between tasks by orthogonalising the concatenated singular vectors:

    wᵢΔᵢ = Uᵢ Σᵢ Vᵢᵀ,  keep k = max(1, ⌊min(m, n) · fraction⌋) triplets of each task,
    U = [U₁ … U_T],  S = diag(Σ₁ … Σ_T),  V = [V₁ … V_T],
    U_⊥ = P Qᵀ (U = P Σ' Qᵀ),  V_⊥ likewise,   τ = α · U_⊥ S V_⊥ᵀ

(:func:`~slimtune.weights.task_subspaces.tsv_factors`). ``fraction`` defaults to 1/T (T = the
number of models), the reference's ``sv_reduction``, so the T·k kept vectors fit in ``min(m, n)``
and ``U_⊥``, ``V_⊥`` have orthonormal columns. Tensors that are not 2-D (norm weights, biases)
are averaged, ``Σ wᵢ τᵢ / Σ wᵢ``, as the reference averages them (note: the matrices are summed,
not averaged). ``alpha`` scales the result, every tensor (1.0: the plain sum of the decorrelated
updates; the reference searches it in (0, 3] on validation data). Model weights wᵢ scale the task matrices
before their SVDs.

Checked against the authors' code (github AntoAndGar/task_singular_vectors,
``src/utils/TSVM_utils.py`` ``compute_and_sum_svd_mem_reduction``, "TSV Merge Orthogonalization"):
the same concatenation and the same product ``u_u v_u diag(S) u_v v_v``. Differences: the
reference keeps ``int(min(m, n) / T)`` triplets per task, 0 for a matrix smaller than T (here at
least 1); it zero-pads U, S and V to ``min(m, n)`` columns (the padding multiplies zero singular
values: the same product); it averages non-2-D tensors without the model weights (the same for
unit weights). SVDs in float32 (float64 for float64 input), ``torch.linalg.svd`` with
``full_matrices=False``; returned in the input's dtype. A matrix too large for memory with at
most :data:`GRAM_COLUMNS` columns (an embedding) is streamed in ranges of rows (hook
``stream``): each task's ``Vᵢ``, ``Σᵢ`` from its Gram matrix in float64
(:mod:`~slimtune.weights.gram_factors`), ``U = [Δᵢ Vᵢ Σᵢ⁻¹]`` and ``U_⊥ = U (UᵀU)^{-1/2}`` range
by range; equal to the whole-matrix merge within float32 SVD error (tests). Reported (METHODS.md): none for this
scale.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimtune.merge.config import MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.gram_factors import inverse_sqrt, right_singular
from slimtune.weights.precision import compute_dtype
from slimtune.weights.task_subspaces import kept_rank, polar_factor, tsv_factors

GRAM_COLUMNS = 4096


class TSVConfig(MergeConfig):
    example: ClassVar[dict] = {"fraction": 0.25}
    method: Literal["tsv"] = "tsv"
    fraction: float | None = Field(None, gt=0, le=1, description="fraction of min(m, n) singular "
                                   "triplets each task keeps (None: 1 / number of models)")
    alpha: float = Field(1.0, description="scale of the merged task vector")


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: TSVConfig, generator=None,
          base=None) -> torch.Tensor:
    work = stacked.to(compute_dtype(stacked))
    w = weights.to(work.dtype)
    if stacked.dim() != 3:  # not a matrix: the weighted mean
        total = w.sum()
        if total == 0:
            raise ValueError("tsv: the weights sum to 0, so a tensor that is not a matrix has no "
                             "weighted mean; change them")
        return (config.alpha * (work * w).sum(dim=0) / total).to(stacked.dtype)
    fraction = config.fraction if config.fraction is not None else 1 / stacked.shape[0]
    U, S, Vh = tsv_factors(work * w, fraction)
    return (config.alpha * (U * S) @ Vh).to(stacked.dtype)


class TSVStream:
    """Pass 1: each weighted task matrix's Gram; pass 2: ``UᵀU``; then ``U_⊥ S V_⊥ᵀ`` by rows."""

    def __init__(self, config: TSVConfig, weights: torch.Tensor, shape: tuple[int, int]):
        self.w = weights.reshape(-1).double()
        fraction = config.fraction if config.fraction is not None else 1 / len(self.w)
        self.k, self.alpha = kept_rank(shape, fraction), config.alpha
        self.grams = torch.zeros(len(self.w), shape[1], shape[1], dtype=torch.float64)
        self.passes, self.whole = 0, False

    def wants_pass(self) -> bool:
        return self.passes < 2

    def left(self, stacked: torch.Tensor) -> torch.Tensor:
        """The rows of ``U = [Δ₁ V₁ Σ₁⁻¹, …]`` for these rows of the task matrices."""
        return torch.cat([(wi * t.double()) @ p for wi, t, p in
                          zip(self.w, stacked, self.project)], dim=1)

    def observe(self, stacked: torch.Tensor, base: torch.Tensor) -> None:
        if self.passes == 0:
            for gram, wi, t in zip(self.grams, self.w, stacked):
                d = wi * t.double()
                gram += d.T @ d
        else:
            u = self.left(stacked)
            self.uu += u.T @ u

    def end_pass(self) -> None:
        self.passes += 1
        if self.passes == 1:
            factors = [right_singular(g) for g in self.grams]
            S = torch.cat([s[:self.k] for s, _ in factors])
            self.project = [v[:, :self.k] * torch.where(s[:self.k] > 0, 1 / s[:self.k], 0)
                            for s, v in factors]
            self.vh = torch.cat([v[:, :self.k].T for _, v in factors])
            self.S, self.uu = S, torch.zeros(len(S), len(S), dtype=torch.float64)
        else:
            self.right = self.alpha * (inverse_sqrt(self.uu) * self.S) @ polar_factor(self.vh)

    def merge_rows(self, stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return (self.left(stacked) @ self.right).to(stacked.dtype)


def stream(config: TSVConfig, weights, shape, generator=None) -> TSVStream | None:
    if len(shape) != 2 or shape[1] > GRAM_COLUMNS or shape[0] < shape[1]:
        return None
    return TSVStream(config, weights, shape)


MERGES.register("tsv", TSVConfig, merge=merge, stream=stream)
