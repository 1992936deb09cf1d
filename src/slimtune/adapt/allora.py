"""ALLoRA (Huang & Balestriero 2024, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws").

    W' = W + B·A                      (no dropout, no scaling: s = 1)
    A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)),   B [out, r] = 0
    every step, before clipping and the optimiser step, for each row θ_i of A and of B:
        ∇θ_i  <-  ∇θ_i / sqrt(||θ_i||² + 1/η²)

Each row's gradient is scaled by a coefficient inversely proportional to the row's ℓ2 norm, capped
at η for rows near zero (B starts at 0, so its rows first move η times faster, then slow down as
they grow): an adaptive learning rate that replaces LoRA's scaling factor and dropout. The rows
are the output units of the two linear maps, x -> A·x (r rows of length in) and h -> B·h (out rows
of length r). The output at step 0 is the base model's (B = 0). The paper reports better accuracy
than LoRA and DoRA on various settings (no single headline number).

The coefficient is applied in the method's ``after_backward`` hook (the training loop calls it
once the step's gradients exist), so it works with any optimiser; ``alpha`` and ``rslora`` are
accepted but not used (scale 1). ``eta`` defaults to 10: this project's choice, the paper's value
could not be checked here.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear, kaiming_uniform_A, layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.targets import factored_layers
from slimtune.weights.precision import compute_dtype


class ALLoRAConfig(AdapterConfig):
    """``method: allora`` -- r, targets, seed, eta (the largest gradient multiplier, reached by
    rows of norm 0; > 0); alpha and rslora are ignored (scale 1)."""

    method: Literal["allora"] = "allora"
    eta: float = Field(10.0, gt=0)


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: ALLoRAConfig, prepared=None):
    W = linear.weight
    dtype = compute_dtype(W)
    A = kaiming_uniform_A(config.r, linear.in_features, layer_generator(config.seed, name), dtype,
                          "cpu")
    B = torch.zeros(linear.out_features, config.r, dtype=dtype)
    return adapted_linear(linear, A, B, 1.0)


def row_coefficients(theta: torch.Tensor, eta: float) -> torch.Tensor:
    """``1 / sqrt(||θ_i||² + 1/η²)`` for each row of ``theta``, as a column ``[rows, 1]``."""
    norm2 = theta.detach().to(compute_dtype(theta)).square().sum(dim=1, keepdim=True)
    return (norm2 + 1.0 / eta ** 2).rsqrt()


@torch.no_grad()
def scale_gradients(model: nn.Module, config: ALLoRAConfig, step: int) -> None:
    """Multiply the gradient of every row of A and B by its ALLoRA coefficient."""
    for layer in factored_layers(model).values():
        for theta in (layer.lowrank.A, layer.lowrank.B):
            if theta.grad is not None:
                theta.grad.mul_(row_coefficients(theta, config.eta).to(theta.grad.dtype))


METHODS.register("allora", ALLoRAConfig, init_layer=init_layer, after_backward=scale_gradients)
