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
``full_matrices=False``; returned in the input's dtype. Reported (METHODS.md): none for this
scale.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimtune.merge.config import MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.precision import compute_dtype
from slimtune.weights.task_subspaces import tsv_factors


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


MERGES.register("tsv", TSVConfig, merge=merge)
