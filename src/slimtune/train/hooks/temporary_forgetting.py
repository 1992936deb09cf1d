"""Active and temporary forgetting of the token embeddings.

Active forgetting (Chen et al. 2023, "Improving Language Plasticity via Pretraining with Active
Forgetting", NeurIPS 2023): while the model trains, its token embedding matrix is reset to a
fresh random initialisation every ``K`` updates, so the body of the network cannot lean on any
particular embeddings and later learns new ones (a new language) quickly. Temporary forgetting
(Anand et al. 2024, "Dual Process Learning: Controlling Use of In-Context vs. In-Weights
Strategies with Weight Forgetting", seeds/004) forgets only during the first ``N`` steps, then
trains normally, which lets in-context (structural) and in-weights solutions coexist.

    after optimiser step t, if t % every == 0 and t <= until:
        E ← N(0, std²) drawn from a generator seeded by (seed, t)   (padding row, if any: 0)
        the optimiser's state of E is dropped (its moments restart at the next step)

``E`` is ``model.get_input_embeddings().weight`` (of the model, or of the first sub-module that
has it: the encoder of a classifier). ``std`` is the model config's ``initializer_range`` (the
distribution Hugging Face models initialise embeddings from: 0.02 for BERT/MiniLM and
SmolLM2), or the ``std`` key, which overrides it and is required for a model without one.
``until`` left out is active forgetting for the whole run. With tied embeddings (SmolLM2's
``lm_head`` is the input embedding matrix) the output head is re-initialised with it: it is the
same tensor. ``every`` defaults to Chen et al.'s reset interval ``K = 1000``. METHODS.md and the
abstracts report no number. Deliberate choices: the draw is on the CPU in float32 (identical on
every device) and the optimiser state is dropped rather than kept. Stateless: a resumed run
draws the same embeddings at the same steps.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.train.hooks.registry import TRAINING_HOOKS, HookConfig, full_training_conflict


class TemporaryForgettingConfig(HookConfig):
    """``method: temporary_forgetting`` -- every, until, std, seed."""

    method: Literal["temporary_forgetting"] = "temporary_forgetting"
    every: int = Field(1000, ge=1, description="optimiser steps between embedding resets")
    until: int | None = Field(None, ge=1, description="last step that may reset (None: every "
                              "reset of the run, i.e. active forgetting)")
    std: float | None = Field(None, gt=0, description="std of the fresh embeddings (default: "
                              "the model config's initializer_range)")


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """``get_input_embeddings()`` of ``model`` or of its first sub-module that has one."""
    for module in model.modules():
        get = getattr(module, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if isinstance(embedding, nn.Embedding):
            return embedding
    raise ValueError(f"hook temporary_forgetting: {type(model).__name__} has no input "
                     "embeddings (get_input_embeddings)")


def init_std(model: nn.Module, config: TemporaryForgettingConfig) -> float:
    if config.std is not None:
        return config.std
    for module in model.modules():
        std = getattr(getattr(module, "config", None), "initializer_range", None)
        if isinstance(std, (int, float)) and std > 0:
            return float(std)
    raise ValueError(f"hook temporary_forgetting: {type(model).__name__} has no "
                     "config.initializer_range: give the std key")


def forgets_at(config: TemporaryForgettingConfig, step: int) -> bool:
    return step % config.every == 0 and (config.until is None or step <= config.until)


def fresh_embeddings(shape: torch.Size, std: float, seed: int, step: int,
                     padding_idx: int | None = None) -> torch.Tensor:
    """``N(0, std²)`` entries from a CPU generator seeded by ``(seed, step)``; float32."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    E = torch.randn(tuple(shape), generator=g) * std
    if padding_idx is not None:
        E[padding_idx] = 0
    return E


def setup(model: nn.Module, config: TemporaryForgettingConfig) -> None:
    """Check, before training, that there are embeddings to forget and a std to draw them with."""
    input_embeddings(model)
    init_std(model, config)


@torch.no_grad()
def forget(model: nn.Module, config: TemporaryForgettingConfig, step: int, optimizer) -> None:
    """after_step: at the forgetting steps, re-initialise the input embeddings and drop their
    optimiser state (the wrapper's and its ``base``'s, for an optimiser that wraps one)."""
    if not forgets_at(config, step):
        return
    embedding = input_embeddings(model)
    E = embedding.weight
    E.copy_(fresh_embeddings(E.shape, init_std(model, config), config.seed, step,
                             embedding.padding_idx))
    while optimizer is not None:  # a wrapping optimiser (SAM, GAM, FSAM) and its base
        optimizer.state.pop(E, None)
        optimizer = getattr(optimizer, "base", None)


def conflict(config: TemporaryForgettingConfig, adapter) -> str | None:
    return full_training_conflict("temporary_forgetting", "re-initialises and trains the token "
                                  "embeddings", adapter)


TRAINING_HOOKS.register("temporary_forgetting", TemporaryForgettingConfig, setup=setup,
                        after_step=forget, conflict=conflict)
