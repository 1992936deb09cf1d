"""EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained
Variance Adaptation").

    for each calibration batch:  per target layer, incremental PCA of its inputs X (k = r·rho
        components, centred); a layer stops being fed once cos(v_i, v_i_prev) >= tau for every
        component i it currently needs;
        rank redistribution: the budget sum(r) over layers goes to the components with the
        largest explained-variance ratios (a layer gets at most k)
    A = top rank_i components [rank_i, in],  B = 0,  W_base = W;  rank_i = 0: the plain nn.Linear

The output at step 0 is the base model's exactly (B = 0). The paper reports faster convergence
than other initialisations and "the highest average score across a multitude of tasks per
domain" (language generation and understanding, image classification, reinforcement learning).

As PEFT's ``init_lora_weights="eva"``: components of layers fed the very same input tensor (q/k/v,
gate/up) are computed once and shared; ``adjust_scaling_factors`` (default) sets the layer's
alpha to ``alpha·rank_i/r``, so its scale stays ``alpha/r`` (``alpha·sqrt(rank_i)/r`` with
rslora) whatever the rank; without it the scale is ``alpha/rank_i`` (``alpha/sqrt(rank_i)``).
Differences: PEFT cycles its dataloader until every layer has converged; here ``calib`` is cycled
at most ``passes`` times, and layers still unconverged then keep their last estimate and are
reported (a RuntimeWarning and ``EvaInit.converged``). ``svd: randomized`` (default) is PEFT's
choice (sketch of 2k columns, ``niter`` power iterations); ``svd: exact`` a full SVD per update.
Shared inputs are detected by tensor identity (PEFT hashes the first batch's values). A layer
fed fewer rows than k per batch (a BERT pooler: one per window) holds fewer components until it
has seen more rows; PEFT skips such batches. PEFT's ``whiten`` option is not implemented.

Memory: per layer group only the ``k × in`` components (plus a mean), and one batch of
activations at a time.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.calib import SameInput
from slimtune.progress import progress_bar
from slimtune.weights.incremental import IncrementalPCA


class EVAConfig(AdapterConfig):
    """``method: eva`` -- r, alpha, targets, rslora, seed; rho (max rank r·rho per layer, >= 1),
    tau (cosine-similarity convergence threshold), adjust_scaling_factors, batch_size (windows per
    forward), passes (max cycles over calib), svd (randomized | exact), niter."""

    method: Literal["eva"] = "eva"
    rho: float = Field(2.0, ge=1.0)
    tau: float = Field(0.99, ge=0.0, le=1.0)
    adjust_scaling_factors: bool = True
    batch_size: int = Field(4, ge=1)
    passes: int = Field(1, ge=1)
    svd: Literal["exact", "randomized"] = "randomized"
    niter: int = Field(4, ge=0)

    @property
    def max_rank(self) -> int:
        return round(self.r * self.rho)


@dataclass
class EvaInit:
    """One layer's result: ``A`` ``[rank, in]`` (rank may be 0), whether its kept components
    converged, how many batches its group was fed, the group's explained-variance ratios."""

    A: torch.Tensor
    converged: bool
    batches: int
    explained_variance_ratio: torch.Tensor


def redistribute_ranks(ratios: dict[str, torch.Tensor], budget: int) -> dict[str, int]:
    """Ranks that give ``budget`` components to the largest ratios over all layers (each layer's
    ratios sorted descending, so a layer's rank is how many of its ratios were picked; ties go to
    the earlier layer)."""
    names = list(ratios)
    owner = torch.cat([torch.full((len(ratios[n]),), i) for i, n in enumerate(names)])
    values = torch.cat([ratios[n].double().cpu() for n in names])
    picked = torch.sort(values, descending=True, stable=True).indices[:budget]
    counts = torch.bincount(owner[picked], minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}


class _Stream:
    """Incremental PCAs of the target layers' inputs, one per distinct input (layer group)."""

    def __init__(self, names: list[str], config: EVAConfig):
        self.config, self.names = config, names
        self.leader: dict[str, str] = {}  # layer -> the first layer seen with the same input
        self.pca: dict[str, IncrementalPCA] = {}
        self.converged: dict[str, torch.Tensor] = {}
        self.batches: dict[str, int] = {}
        self.seen = SameInput()  # tensors met in the current forward (first batch only)

    def on_input(self, name: str, module, args) -> None:
        x = args[0]
        if name not in self.leader:  # first batch: group layers fed the very same tensor
            leader = self.seen.lookup(x)
            if leader is not None:
                self.leader[name] = leader
                return
            self.seen.remember(x, name)
            self.leader[name] = name
        c = self.config
        pca = self.pca.setdefault(name, IncrementalPCA(c.max_rank, c.svd, c.niter, c.seed))
        previous = pca.components
        pca.update(x.reshape(-1, x.shape[-1]))
        self.batches[name] = self.batches.get(name, 0) + 1
        flags = torch.zeros(c.max_rank, dtype=torch.bool)
        if previous is not None:  # components beyond those estimated before: not converged
            j = min(len(previous), len(pca.components))
            similarity = F.cosine_similarity(pca.components[:j], previous[:j], dim=1)
            flags[:j] = (similarity >= c.tau).cpu()
        self.converged[name] = flags

    def needs_more(self, ranks: dict[str, int]) -> list[str]:
        """Leaders whose components needed by the current ranks have not all converged."""
        need = {}
        for name, rank in ranks.items():
            need[self.leader[name]] = max(need.get(self.leader[name], 0), rank)
        return [ld for ld, k in need.items() if not bool(self.converged[ld][:k].all())]

    def ranks(self) -> dict[str, int]:
        budget = self.config.r * len(self.names)
        ratios = {n: self.pca[self.leader[n]].explained_variance_ratio for n in self.names}
        return redistribute_ranks(ratios, budget)


@torch.no_grad()
def prepare(model: nn.Module, names: list[str], config: EVAConfig,
            calib: torch.Tensor, progress: bool = True) -> dict[str, EvaInit]:
    k = config.max_rank
    for name in names:
        n_in = model.get_submodule(name).in_features
        if k > n_in:
            raise ValueError(f"eva: r·rho = {k} components exceed in_features = {n_in} of {name}")
    calib = calib.to(next(model.parameters()).device)
    starts = [s for _ in range(config.passes) for s in range(0, len(calib), config.batch_size)]
    stream, ranks, active = _Stream(names, config), None, list(names)
    was_training = model.training
    model.eval()
    bar, task = progress_bar(len(starts), f"eva: incremental PCA of {len(names)} layers inputs",
                             progress)
    try:
        with bar:
            for step, s in enumerate(starts):
                handles = [model.get_submodule(n).register_forward_pre_hook(
                    partial(stream.on_input, n)) for n in active]
                try:
                    model(input_ids=calib[s:s + config.batch_size], use_cache=False)
                finally:
                    for handle in handles:
                        handle.remove()
                    stream.seen.clear()
                if step == 0 and len(stream.leader) < len(names):
                    unused = [n for n in names if n not in stream.leader]
                    raise ValueError(f"eva: targets {unused[:4]} received no input in a forward "
                                     "pass of the model")
                ranks = stream.ranks()
                active = stream.needs_more(ranks)
                groups = len(stream.pca)
                bar.update(task, advance=1, description=f"eva: {groups - len(active)}/{groups} "
                                                        "layer groups converged")
                if not active:
                    break
    finally:
        model.train(was_training)
    result = {}
    for name in names:
        ld, rank = stream.leader[name], ranks[name]
        result[name] = EvaInit(stream.pca[ld].components[:rank].clone(),
                               bool(stream.converged[ld][:rank].all()), stream.batches[ld],
                               stream.pca[ld].explained_variance_ratio)
    late = [n for n, e in result.items() if not e.converged]
    if late:
        warnings.warn(f"eva: {len(late)} of {len(names)} layers did not converge (tau="
                      f"{config.tau}) within {len(starts)} batches, e.g. {late[:4]}; they use the "
                      "estimate from all batches (more calibration windows or passes help)",
                      RuntimeWarning, stacklevel=2)
    return result


def layer_scale(config: EVAConfig, rank: int) -> float:
    """``alpha_i / rank_i`` (``/ sqrt(rank_i)`` with rslora), ``alpha_i = alpha·rank_i/r`` when
    ``adjust_scaling_factors`` (PEFT's rule) else ``alpha``."""
    alpha = config.alpha * rank / config.r if config.adjust_scaling_factors else config.alpha
    return alpha / (math.sqrt(rank) if config.rslora else rank)


def init_layer(name: str, linear: nn.Linear, config: EVAConfig, prepared: EvaInit | None):
    if prepared is None:
        raise ValueError(f"eva: no components for {name}; use slimtune.adapt.apply with calib=")
    rank = prepared.A.shape[0]
    if rank == 0:
        return linear
    B = torch.zeros(linear.out_features, rank, dtype=prepared.A.dtype, device=prepared.A.device)
    return adapted_linear(linear, prepared.A, B, layer_scale(config, rank))


METHODS.register("eva", EVAConfig, init_layer=init_layer, prepare=prepare)
