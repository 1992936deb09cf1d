"""LoRA-GGPO (Chang et al. 2025, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via
Gradient-Guided Perturbation Optimization").

LoRA (W' = W + s·B·A, A Kaiming-uniform, B = 0) trained at randomly perturbed weights, the
perturbation sized per output row from the row's weight norm and gradient norm:

    step t:   W' + ε_t enters the forward and backward pass (the loss's gradient is taken there)
    ε_t[i, :] ~ N(0, σ_i² I),   σ_i = f(t) · (ρ / sqrt(in)) · ((1 - β)·||W'_i|| + β·γ_i·||W'||_F)
    γ_i = ||∇B_i|| / ||∇B||_F   (the step t-1 gradient of B's row i; 1/sqrt(out) before any)
    f(t) = (1 - cos(π t / T)) / 2   (0 -> 1 over the run's T steps; ``ramp: false``, or no T
                                     recorded by the training loop: f = 1)

Rows whose gradient was large get a larger share of the perturbation (β = ``grad_weight``); with
β = 0 this is Flat-LoRA's random weight perturbation (Li et al. 2024, whose ρ = 0.05 and cosine
ramp this keeps). Minimising the loss in expectation over ε favours flat minima, which the paper
reports mitigates LoRA's double descent, outperforming LoRA and its variants on NLU and NLG
benchmarks (no single headline number). The reference code (llm172/LoRA-GGPO) and the paper's
body were not available here: the way gradient and weight norms combine (β, the normalisation
γ_i, the use of B's gradient for the row gradient) is this project's reading of the abstract and
should be checked against the paper.

The perturbation is never written into a weight: the method's ``before_step`` hook sets each
layer's σ and seed for the step, a forward hook on the layer adds x·ε_tᵀ to its output while
gradients are enabled, and ``after_backward`` records B's row gradient norms (in
``method_state``, so a resumed run continues exactly) and clears the step's σ. Evaluation (no
gradients), merging and the saved adapter therefore never see ε. ε is drawn from a generator
seeded by (seed, layer, step) in the forward and drawn again in the backward instead of being
stored: each adapted layer costs one more dense product forward and backward while training,
plus drawing its out x in noise twice.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.adapt.api import method_state
from slimtune.adapt.factors import adapted_linear, kaiming_uniform_A, layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.targets import factored_layers
from slimtune.weights.precision import compute_dtype


class GGPOConfig(AdapterConfig):
    """``method: ggpo`` -- r, alpha, targets, rslora, seed (also of the perturbations); rho (the
    perturbation's size relative to a row's norm, >= 0; 0 is plain LoRA), grad_weight (β, the
    share sized by gradient norms, in [0, 1]), ramp (cosine ramp of the size over the run)."""

    method: Literal["ggpo"] = "ggpo"
    rho: float = Field(0.05, ge=0)
    grad_weight: float = Field(0.5, ge=0, le=1)
    ramp: bool = True


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: GGPOConfig, prepared=None):
    dtype = compute_dtype(linear.weight)
    A = kaiming_uniform_A(config.r, linear.in_features, layer_generator(config.seed, name), dtype,
                          "cpu")
    B = torch.zeros(linear.out_features, config.r, dtype=dtype)
    return adapted_linear(linear, A, B, config.scale)


def noise(sigma: torch.Tensor, n_in: int, seed: int, tag: str) -> torch.Tensor:
    """ε ``[out, n_in]`` (float32): row i is ``σ_i`` times standard normals from the generator of
    ``(seed, tag)`` on ``sigma``'s device."""
    g = layer_generator(seed, tag, sigma.device)
    z = torch.randn(sigma.shape[0], n_in, generator=g, device=sigma.device, dtype=torch.float32)
    return z * sigma.float()[:, None]


class Perturbation(torch.autograd.Function):
    """``x·εᵀ`` with ε = :func:`noise` (a constant), drawn again in backward, not stored."""

    @staticmethod
    def forward(ctx, x, sigma, seed, tag):
        ctx.save_for_backward(sigma)
        ctx.key = (x.shape[-1], seed, tag)
        return F.linear(x, noise(sigma, x.shape[-1], seed, tag).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (sigma,) = ctx.saved_tensors
        return grad @ noise(sigma, *ctx.key).to(grad.dtype), None, None, None


def add_perturbation(layer: nn.Module, args, output):
    """Forward hook: the layer's output at ``W' + ε`` while this step's σ is set and gradients
    are enabled (training); unchanged otherwise."""
    spec = layer.__dict__.get("ggpo_sigma")
    if spec is None or layer.merged or not torch.is_grad_enabled():
        return None
    sigma, seed, tag = spec
    return output + Perturbation.apply(args[0], sigma, seed, tag).to(output.dtype)


def ramp(config: GGPOConfig, step: int, total: int | None) -> float:
    if not config.ramp or not total:
        return 1.0
    return 0.5 * (1.0 - math.cos(math.pi * min(step, total) / total))


@torch.no_grad()
def row_sigma(layer: nn.Module, grad_norm: torch.Tensor | None, config: GGPOConfig,
              factor: float) -> torch.Tensor:
    """σ ``[out]`` of one layer (see the module docstring), float32."""
    W = layer.combined_weight()
    W = W.to(compute_dtype(W))
    rows = torch.linalg.vector_norm(W, dim=1)
    if grad_norm is None or not bool(grad_norm.any()):
        share = torch.full_like(rows, 1.0 / math.sqrt(rows.numel()))
    else:
        share = grad_norm.to(rows) / torch.linalg.vector_norm(grad_norm.to(rows))
    beta = config.grad_weight
    mixed = (1 - beta) * rows + beta * share * torch.linalg.vector_norm(W)
    return (factor * config.rho / math.sqrt(layer.in_features) * mixed).float()


def before_step(model: nn.Module, config: GGPOConfig, step: int) -> None:
    """Set every layer's σ and noise seed for step ``step`` (0-based), registering the forward
    hook once per layer."""
    state = method_state(model)
    factor = ramp(config, step, state.get("total_steps"))
    for name, layer in factored_layers(model).items():
        if not any(h is add_perturbation for h in layer._forward_hooks.values()):
            layer.register_forward_hook(add_perturbation)
        layer.ggpo_sigma = None
        if factor * config.rho > 0 and not layer.merged:
            sigma = row_sigma(layer, state.get(f"grad_norm/{name}"), config, factor)
            layer.ggpo_sigma = (sigma, config.seed, f"{name}/ggpo/{step}")


@torch.no_grad()
def after_backward(model: nn.Module, config: GGPOConfig, step: int) -> None:
    """Record B's row gradient norms for the next step's σ; clear this step's perturbation."""
    state = method_state(model)
    for name, layer in factored_layers(model).items():
        grad = layer.lowrank.B.grad
        if grad is not None:
            state[f"grad_norm/{name}"] = torch.linalg.vector_norm(grad.float(), dim=1).cpu()
        layer.ggpo_sigma = None


METHODS.register("ggpo", GGPOConfig, init_layer=init_layer, before_step=before_step,
                 after_backward=after_backward)
