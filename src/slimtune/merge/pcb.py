"""PCB-Merging (Du et al. 2024, "Parameter Competition Balancing for Model Merging", NeurIPS 2024):
score every entry of every task vector by its importance within its task (intra-balancing) and its
agreement with the other tasks (inter-balancing), drop each task's low scores, and average the
task vectors weighted by the remaining scores. The paper writes

    β_intra,i = softmax(n · Norm(τᵢ ⊙ τᵢ)),   β_inter,i = Σⱼ softmax(Norm(τᵢ ⊙ τⱼ)),
    βᵢ = β_intra,i ⊙ β_inter,i,   mᵢ = βᵢ ≥ (the (1 − ratio) quantile of βᵢ),
    τ = λ · Σᵢ (mᵢ ⊙ βᵢ ⊙ τᵢ) / Σᵢ (mᵢ ⊙ βᵢ)

This file follows the authors' reference code instead (github duguodong7/pcb-merging,
``pcb-merging.py`` ``PCB_merge``, which its README names as the method's implementation), via
:func:`~slimtune.weights.task_masks.pcb_balancing` and
:func:`~slimtune.weights.task_masks.pcb_drop_scale`:

    |τ̃ᵢ| = |τᵢ| clamped to its 0.01% and 99.99% order statistics (outliers),
    β_intra,i = exp(n · Norm(|τ̃ᵢ|)²),   β_inter,i = tanh(τᵢ ⊙ Σⱼ τⱼ),   βᵢ = β_intra,i ⊙ β_inter,i,
    sᵢ = Norm(max(βᵢ, βᵢ at its ⌊d(1 − ratio)⌋-th smallest)),
    τ = λ · Σᵢ wᵢ sᵢ ⊙ τ̃ᵢ / max(Σᵢ sᵢ, 1e-12)

with Norm the min-max normalisation over a task's entries. So, unlike the paper's formulas: the
softmax is the unnormalised ``exp`` (its denominator is a per-task constant, which the min-max
normalisation of the drop step removes) of the squared normalised magnitude, not of the
normalised square; inter-balancing is ``tanh`` of ``τᵢ`` times the sum of all task vectors (the
repository's ``vision_source_code/pcb_ES.py`` has a variant, Σⱼ tanh of products of normalised
signed magnitudes, and clamps 1% outliers; ``pcb-merging.py`` is the one followed here);
the kept scores are shifted by the threshold and rescaled to [0, 1] per task (so the entry at the
threshold gets weight 0, and ``ratio: 1`` still drops each task's lowest-scored entry); and the
merged entries are the outlier-clamped ``τ̃ᵢ``. ``ratio`` is the fraction of entries kept (the
reference's ``pcb_ratio``: 0.1 by default in ``PCB_merge``, 0.05 in its evolutionary-search
script).

Model weights enter as the reference's per-task coefficients ``lams`` (``pcb_ES.py``
``compute_acc``): the scores are computed on the unweighted task vectors and ``wᵢ`` multiplies
``τ̃ᵢ`` in the numerator only; λ (``lambda``) scales the result.

Deliberate differences from the reference: everything is per tensor (the reference flattens the
whole model into one vector); ``exp(n · (x² − 1))`` replaces ``exp(n · x²)`` (a constant factor
the drop step removes; it cannot overflow for many tasks); a task whose scores are all equal on a
tensor (e.g. a zero task vector) gets weight 0 there, where the reference divides 0 by 0 (so a
tensor of one entry is left at the base: its scores cannot be normalised).
Computed in float32 (float64 for float64 input), returned in the input's dtype. A tensor too
large for memory is streamed in ranges of rows (hook ``stream``) with the same result: two
counting passes for the magnitude clamps' order statistics, two for the score cut (exact k-th
values, :class:`~slimtune.weights.magnitude_threshold.KthMagnitude`) and the largest score. Reported
(METHODS.md): none for this scale; the abstract reports gains over earlier merging methods
across tasks, domains, model sizes and LLMs (seeds/003).
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimtune.merge.config import Lambda, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.precision import compute_dtype
from slimtune.weights.magnitude_threshold import KthMagnitude
from slimtune.weights.task_masks import (pcb_balancing, pcb_drop_scale, pcb_scores,
                                         pcb_statistic_indices, pcb_weights)


class PCBConfig(MergeConfig):
    example: ClassVar[dict] = {"ratio": 0.5}
    method: Literal["pcb"] = "pcb"
    ratio: float = Field(0.1, gt=0, le=1, description="fraction of each task's entries kept")
    lambda_: float = Lambda


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: PCBConfig, generator=None,
          base=None) -> torch.Tensor:
    k = stacked.shape[0]
    flat = stacked.reshape(k, -1).to(compute_dtype(stacked))
    w = weights.reshape(k, 1).to(flat.dtype)
    clamped, beta = pcb_balancing(flat)
    scale = pcb_drop_scale(beta, config.ratio)
    merged = (w * scale * clamped).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)
    return (config.lambda_ * merged).reshape(stacked.shape[1:]).to(stacked.dtype)


def piece_rows(stacked: torch.Tensor) -> int:
    """Rows per piece: the scores make ~10 temporaries of the task vectors' size, so a range of
    rows is scored a quarter at a time."""
    return max(1, -(-stacked.shape[1] // 4))


class PCBStream:
    """Passes 1–2: each task's magnitude clamps; passes 3–4: its score cut and maximum."""

    def __init__(self, config: PCBConfig, weights: torch.Tensor, shape: tuple[int, ...]):
        self.d, self.k = math.prod(shape), weights.shape[0]
        self.low_rank, self.high_rank, self.cut_rank = pcb_statistic_indices(self.d, config.ratio)
        self.finders = [[KthMagnitude(self.d, self.d - r) for r in (self.low_rank,
                                                                     self.high_rank)]
                        for _ in range(self.k)]
        self.config, self.weights, self.passes, self.whole = config, weights, 0, False
        self.top = torch.full((self.k, 1), -math.inf)

    def wants_pass(self) -> bool:
        return self.passes < 4

    def scores(self, stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pcb_scores(stacked.reshape(self.k, -1), self.low, self.high)

    def observe(self, stacked: torch.Tensor, base: torch.Tensor) -> None:
        if self.passes < 2:
            for finders, t in zip(self.finders, stacked):
                for finder in finders:
                    finder.count(t)
            return
        for piece in stacked.split(piece_rows(stacked), dim=1):
            beta = self.scores(piece)[1]
            for finder, row in zip(self.cuts, beta):
                finder.count(row)
            if self.passes == 2:
                self.top = torch.maximum(self.top, beta.amax(dim=1, keepdim=True))

    def end_pass(self) -> None:
        self.passes += 1
        finders = self.finders if self.passes <= 2 else [[f] for f in self.cuts]
        for f in (f for fs in finders for f in fs):
            if self.passes in (1, 3):
                f.next_pass()
        if self.passes == 2:
            self.low, self.high = (torch.tensor([[fs[i].value()] for fs in self.finders])
                                   for i in (0, 1))
            self.cuts = [KthMagnitude(self.d, self.d - self.cut_rank, signed=True)
                         for _ in range(self.k)]
        if self.passes == 4:
            self.cut = torch.tensor([[f.value()] for f in self.cuts])

    def merge_rows(self, stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.merge_piece(piece)
                          for piece in stacked.split(piece_rows(stacked), dim=1)])

    def merge_piece(self, stacked: torch.Tensor) -> torch.Tensor:
        clamped, beta = self.scores(stacked)
        scale = pcb_weights(beta, self.cut, self.top)
        w = self.weights.reshape(self.k, 1)
        merged = (w * scale * clamped).sum(dim=0) / scale.sum(dim=0).clamp(min=1e-12)
        return (self.config.lambda_ * merged).reshape(stacked.shape[1:])


MERGES.register("pcb", PCBConfig, merge=merge,
                stream=lambda config, weights, shape, generator=None:
                PCBStream(config, weights, shape))
