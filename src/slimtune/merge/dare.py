"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch"): drop each entry of each task vector with probability 1 − ``density``,
rescale what is kept, then merge ``linear`` (λ Σ wᵢ τ̃ᵢ, PEFT's ``dare_linear``) or ``ties``
(elect + disjoint merge as in :mod:`slimtune.merge.ties`, PEFT's ``dare_ties``).

``rescale: inverse`` divides by ``density`` (the paper: each entry's expectation is unchanged);
``l1`` matches the kept entries' L1 norm to the undropped vector's (mergekit's ``rescale``). The
masks come from a ``torch.Generator`` seeded with ``seed``, drawn task by task with
``torch.bernoulli`` (so the same seed gives PEFT's and mergekit's masks after
``torch.manual_seed(seed)``; ``torch.bernoulli`` with a tensor of probabilities draws entry by
entry, so a tensor too large for memory is streamed in ranges of rows with the same masks: hook
``stream``, one generator per task placed where that task's draws start, and for ``l1`` a
counting pass for the two norms). With ``then: ties``, ``normalize`` (default false, as mergekit's
``dare_ties``) divides the agreeing entries as :mod:`slimtune.merge.ties` does; PEFT's
``dare_ties`` is ``convention: peft, normalize: true``.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch

from slimtune.merge.config import Convention, Density, Lambda, Majority, MergeConfig
from slimtune.merge.registry import MERGES
from slimtune.weights.task_vectors import bernoulli_mask, elect_and_merge, rescale_kept


class DareConfig(MergeConfig):
    example: ClassVar[dict] = {"density": 0.5, "seed": 1}
    method: Literal["dare"] = "dare"
    density: float = Density
    rescale: Literal["inverse", "l1"] = "inverse"
    then: Literal["linear", "ties"] = "linear"
    lambda_: float = Lambda
    majority: Majority = "total"
    convention: Convention = "mergekit"
    normalize: bool = False
    seed: int = 0


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: DareConfig,
          generator: torch.Generator | None = None, base=None) -> torch.Tensor:
    kept = torch.stack([rescale_kept(t, t * bernoulli_mask(t, config.density, generator),
                                     config.density, config.rescale) for t in stacked])
    return combine(kept, weights, config)


def combine(kept: torch.Tensor, weights: torch.Tensor, config: DareConfig) -> torch.Tensor:
    if config.then == "linear":
        return config.lambda_ * (kept * weights).sum(dim=0)
    return config.lambda_ * elect_and_merge(kept, weights, config.majority, config.convention,
                                            config.normalize)


def skip_draws(generator: torch.Generator, count: int, step: int = 1 << 22) -> None:
    """Advance ``generator`` past the draws of ``count`` Bernoulli entries."""
    for start in range(0, count, step):
        torch.bernoulli(torch.full((min(step, count - start),), 0.5), generator=generator)


class DareStream:
    """Task i's draws start where task i − 1's whole tensor ended, as in :func:`merge`: with
    ``l1``, one counting pass per task draws its masks in turn and sums its two norms; with
    ``inverse``, the first k − 1 tasks' draws are skipped to find where each starts. The shared
    generator ends where the last task's draws end."""

    def __init__(self, config: DareConfig, weights: torch.Tensor, shape: tuple[int, ...],
                 generator: torch.Generator):
        self.n, self.k = math.prod(shape), weights.shape[0]
        self.config, self.weights, self.generator, self.whole = config, weights, generator, False
        self.starts = [generator.get_state()]
        self.passes = 0
        self.norms = torch.zeros(self.k, 2, dtype=torch.float64)  # ‖τᵢ‖₁, ‖kept τᵢ‖₁
        if config.rescale == "inverse":
            for _ in range(self.k - 1):
                skip_draws(generator, self.n)
                self.starts.append(generator.get_state())
            self.restart()

    def restart(self) -> None:
        self.generators = [torch.Generator().set_state(s) for s in self.starts[:self.k]]
        self.merged_rows = 0

    def wants_pass(self) -> bool:
        return self.config.rescale == "l1" and self.passes < self.k

    def observe(self, stacked: torch.Tensor, base: torch.Tensor) -> None:
        t = stacked[self.passes]
        kept = t * bernoulli_mask(t, self.config.density, self.generator)
        self.norms[self.passes, 0] += t.abs().double().sum()
        self.norms[self.passes, 1] += kept.abs().double().sum()

    def end_pass(self) -> None:
        self.passes += 1
        self.starts.append(self.generator.get_state())
        if self.passes == self.k:
            self.restart()

    def merge_rows(self, stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        for i, (t, generator) in enumerate(zip(stacked, self.generators)):
            t *= bernoulli_mask(t, self.config.density, generator)
            if self.config.rescale == "inverse":
                t /= self.config.density
            elif self.norms[i, 1] > 0:
                t *= float(self.norms[i, 0]) / float(self.norms[i, 1])
        self.merged_rows += stacked[0].numel()
        if self.merged_rows == self.n:  # the shared stream goes on after the last task's draws
            self.generator.set_state(self.generators[-1].get_state())
        return combine(stacked, self.weights, self.config)


MERGES.register("dare", DareConfig, merge=merge,
                stream=lambda config, weights, shape, generator:
                DareStream(config, weights, shape, generator))
