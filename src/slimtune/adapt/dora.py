"""DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

    W' = m ⊙ (W + s·B·A) / ||W + s·B·A||_row,    m = ||W||_row at init (trainable)

The weight is split into a magnitude ``m`` (one value per output row of ``W [out, in]``, the
paper's column norm of ``Wᵀ``) and a direction that LoRA updates; A and B are LoRA's (seeded
Kaiming-uniform A, zero B, ``s = alpha / r`` or ``alpha / sqrt(r)``), so the output at step 0 is the
base model's. As the paper suggests (§4.3) and PEFT does, the row norm is treated as a constant
(detached), so only ``m``, A and B receive gradients. The rescaling is the layer's
:class:`~slimtune.layers.WeightNormScale` transform, applied to the pre-bias output and folded into
the weight by ``merge``.

The paper reports LLaMA-7B commonsense reasoning 78.4 average vs LoRA 74.7 at the same rank; PEFT
measures 20%-2x slower training than LoRA (the norm of the combined weight every step).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from slimtune.adapt.factors import adapted_linear
from slimtune.adapt.lora import lora_factors
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import WeightNormScale


class DoRAConfig(AdapterConfig):
    """``method: dora`` -- r, alpha, targets, rslora, seed (as LoRA)."""

    method: Literal["dora"] = "dora"


def row_norms(W: torch.Tensor) -> torch.Tensor:
    """``||W||_row`` exactly as ``WeightNormScale`` computes it, so the step-0 scale is 1."""
    return torch.linalg.vector_norm(W, dim=1)


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: DoRAConfig, prepared=None):
    A, B = lora_factors(name, linear, config)
    magnitude = row_norms(linear.weight.detach()).clone()
    return adapted_linear(linear, A, B, config.scale, transform=WeightNormScale(magnitude))


METHODS.register("dora", DoRAConfig, init_layer=init_layer)
