"""KnOTS (Stoica et al. 2025, "Model merging with SVD to tie the KnOTS", ICLR 2025): the task
updates are put side by side and decomposed once, ``[ΔW₁, …, ΔWₖ] = U·S·[V₁ᵀ, …, Vₖᵀ]``, so every
task is expressed in one shared basis ``U·S`` by its own ``Vᵢ``; the ``Vᵢ`` are then merged by an
existing method (``then: ties``: trim each to its top-``density`` magnitudes, elect signs, average
the agreeing entries, as :mod:`slimtune.merge.ties`; ``then: linear``: ``Σ wᵢ Vᵢ``, task
arithmetic), and ``ΔW = λ·U·S·V̂ᵀ``.

On LoRA adapters the basis comes from the factors (one QR of ``[B₁, …, Bₖ]``, one small SVD;
:func:`~slimtune.weights.lora_merging.shared_basis`) and the result stays factored: ``B = λ·U·S``,
``A = V̂ᵀ``, rank at most ``Σ rᵢ``. On dense task vectors the SVD is of the dense matrices; tensors
that are not matrices (norm weights) merge by ``then`` directly. Both paths give the same ``ΔW``
when the dense vectors are the adapters' products (tested). A dense matrix too large for memory
with at most :data:`GRAM_COLUMNS` columns per task (an embedding) is streamed in ranges of rows
(hook ``stream``): ``V`` and ``S`` from the Gram matrix of ``X = [ΔW₁, …, ΔWₖ]`` in float64
(:mod:`~slimtune.weights.gram_factors`), and since ``U·S = X·V``, ``ΔW = λ·X·V·V̂ᵀ`` range by
range; equal to the whole-matrix merge within float32 SVD error (tests). Reported (METHODS.md): none for this
scale (the paper: up to 4.3% better than other LoRA merges on vision and language tasks).
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch

from slimtune.merge.config import Convention, Lambda, Majority, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.gram_factors import right_singular
from slimtune.weights.lora_merging import shared_basis
from slimtune.weights.task_vectors import elect_and_merge, keep_top_magnitude
from pydantic import Field

GRAM_COLUMNS = 4096


class KnotsConfig(MergeConfig):
    example: ClassVar[dict] = {"then": "ties", "density": 0.5}
    method: Literal["knots"] = "knots"
    then: Literal["ties", "linear"] = "ties"
    density: float = Field(1.0, gt=0, le=1, description="ties: fraction of each Vᵢ kept")
    lambda_: float = Lambda
    majority: Majority = "total"
    convention: Convention = "mergekit"


def merge_coordinates(V: torch.Tensor, weights: torch.Tensor, config: KnotsConfig) -> torch.Tensor:
    """The ``then`` merge of stacked ``[k, ...]`` per-task coordinates."""
    if config.then == "linear":
        return (V * weights).sum(dim=0)
    trimmed = torch.stack([keep_top_magnitude(v, config.density, "argsort") for v in V])
    return elect_and_merge(trimmed, weights, config.majority, config.convention)


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: KnotsConfig, generator=None,
          base=None) -> torch.Tensor:
    if stacked.dim() != 3:
        return config.lambda_ * merge_coordinates(stacked, weights, config)
    dtype = torch.float64 if stacked.dtype == torch.float64 else torch.float32
    U, S, Vts = shared_basis(dense=[t.to(dtype) for t in stacked])
    merged = merge_coordinates(torch.stack(Vts), weights.to(dtype), config)
    return (config.lambda_ * (U * S) @ merged).to(stacked.dtype)


def merge_factors(factors, weights: torch.Tensor, config: KnotsConfig, generator=None):
    U, S, Vts = shared_basis(factors=[(B.float(), A.float()) for B, A in factors])
    merged = merge_coordinates(torch.stack(Vts), weights.reshape(-1, 1, 1).float(), config)
    return config.lambda_ * (U * S), merged


class KnotsStream:
    """One pass summing the Gram matrix of ``[ΔW₁, …, ΔWₖ]``; then ``λ·X·V·V̂ᵀ`` by rows."""

    def __init__(self, config: KnotsConfig, weights: torch.Tensor, shape: tuple[int, int]):
        self.config, self.weights, self.shape = config, weights.double(), shape
        width = len(weights) * shape[1]
        self.gram = torch.zeros(width, width, dtype=torch.float64)
        self.passes, self.whole = 0, False

    def wants_pass(self) -> bool:
        return self.passes < 1

    def observe(self, stacked: torch.Tensor, base: torch.Tensor) -> None:
        x = torch.cat(list(stacked.double()), dim=1)
        self.gram += x.T @ x

    def end_pass(self) -> None:
        self.passes += 1
        S, V = right_singular(self.gram)
        # the numerical rank a float32 SVD of X keeps (shared_basis)
        tol = max(self.shape[0], self.gram.shape[0]) * torch.finfo(torch.float32).eps * S[0]
        V = V[:, :int((S > tol).sum())]
        n = self.shape[1]
        coordinates = torch.stack([V[i * n:(i + 1) * n].T for i in range(len(self.weights))])
        self.right = self.config.lambda_ * V @ merge_coordinates(coordinates, self.weights,
                                                                 self.config)

    def merge_rows(self, stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return (torch.cat(list(stacked.double()), dim=1) @ self.right).to(stacked.dtype)


def stream(config: KnotsConfig, weights, shape, generator=None) -> KnotsStream | None:
    k = weights.shape[0]
    if len(shape) != 2 or k * shape[1] > GRAM_COLUMNS or shape[0] < k * shape[1]:
        return None
    return KnotsStream(config, weights, shape)


MERGES.register("knots", KnotsConfig, merge=merge, merge_factors=merge_factors, stream=stream)
