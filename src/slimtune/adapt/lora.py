"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and rsLoRA
(Kalajdzievski 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA").

    W' = W + s·B·A,   A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)),  B [out, r] = 0,
    s = alpha / r   (rsLoRA: s = alpha / sqrt(r), ``rslora: true``)

Only A and B train; the output at step 0 is the base model's exactly (B = 0). LoRA reports
GPT-3 175B fine-tuning matched with 10,000x fewer trainable parameters; rsLoRA reports that
alpha/sqrt(r) keeps learning stable as r grows. A is drawn from a per-layer generator seeded
from ``(seed, layer name)``, so an adapter is reproducible from its config.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from slimtune.adapt.factors import adapted_linear, kaiming_uniform_A, layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.weights.precision import compute_dtype


class LoRAConfig(AdapterConfig):
    """``method: lora`` -- r, alpha, targets, rslora, seed."""

    method: Literal["lora"] = "lora"


def lora_factors(name: str, linear: nn.Linear, config: AdapterConfig):
    """``(A, B)``: seeded Kaiming-uniform A, zero B, in the weight's compute dtype."""
    W = linear.weight
    dtype = compute_dtype(W)
    g = layer_generator(config.seed, name)
    A = kaiming_uniform_A(config.r, linear.in_features, g, dtype, "cpu").to(W.device)
    B = torch.zeros(linear.out_features, config.r, dtype=dtype, device=W.device)
    return A, B


def init_layer(name: str, linear: nn.Linear, config: LoRAConfig, prepared=None):
    A, B = lora_factors(name, linear, config)
    return adapted_linear(linear, A, B, config.scale)


METHODS.register("lora", LoRAConfig, init_layer=init_layer)
