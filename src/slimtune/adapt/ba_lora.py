"""BA-LoRA (Chang et al. 2024, "BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate
Catastrophic Inheritance in Large Language Models").

PiSSA's initialisation (A = sqrt(S_r/s)·V_rᵀ, B = U_r·sqrt(S_r/s), W_base = W - s·B·A) trained on

    L = L_task + λ₁·L_consistency + λ₂·L_diversity + λ₃·L_svd

with y the adapted model's logits and y₀ the pre-trained model's (the adapter disabled) on the
same batch. Generation (logits ``[b, t, V]``, p = softmax(y), p₀ = softmax(y₀)):

    L_consistency = Σ_{b,t} KL(p₀ || p) / b         L_diversity = -mean_{b,t} H(p)
    L_svd = -mean_b ( Σ_{i≤k} σ_i(y_b) / Σ_i σ_i(y_b) )   (σ(y_b): singular values of [t, V])

Classification (logits ``[b, C]``), with ŷ = y/||y|| per example:

    L_consistency = mean (ŷ - ŷ₀)²                   L_diversity = Σ_{i≠j} Cov(y)_ij² / C
    L_svd = -Σ_{i≤k} σ_i(y) / Σ_i σ_i(y)              (Cov over the batch; 0 for one example)

Consistency keeps the outputs near the pre-trained model's, diversity spreads them (maximal
entropy, decorrelated classes), the SVD term concentrates them on their principal components.
The paper reports BA-LoRA above LoRA and its variants on NLU and NLG benchmarks (no headline
number here). Defaults as the reference code (cyp-jlu-ai/BA-LoRA ``train.py``): λ = 1e-4, 3e-4,
1e-4, k = 3. The reference flattens the logits to ``[b, t·V]`` before its SVD and then indexes
the singular values per example; this takes each example's ``[t, V]`` matrix, which is what that
indexing means. Log-probabilities come from ``log_softmax`` (the reference logs softmax outputs).

Wiring: the method's ``before_step`` hook registers (once) a forward hook on the model that, in
any forward with gradients enabled, runs the model a second time without gradients, in eval mode
and with every layer's low-rank part swapped for its frozen initial factors (``origin``: base +
origin is the pre-trained weight), and keeps both outputs on the model (``ba_lora_outputs``, not
saved). The ``loss`` hook, which the training loop calls after each micro-batch's forward, takes
them and returns the three terms. Cost: one extra forward without gradients per training forward
(about a third more compute per step) and one extra set of logits in memory; nothing at
evaluation. The SVD term needs each example's singular values (``torch.linalg.svdvals``, with
its backward): for 4 windows of 256 tokens over SmolLM2's 49152-token vocabulary about 12 s
forward and backward on 2 CPU threads, four times the model's own (3 s with LoRA on every
linear). A model whose output has no ``logits`` gets no regulariser; a classifier's pre-trained
pass keeps its current head (the head is not part of the adapter's layers: it trains in full).
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear, top_singular
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.targets import factored_layers
from slimtune.weights.svd import balanced_split


class BALoRAConfig(AdapterConfig):
    """``method: ba_lora`` -- r, alpha, targets, rslora, seed; lambda_consistency,
    lambda_diversity, lambda_svd (weights of the three terms, >= 0), k (leading singular values,
    >= 1), svd (exact | gram | randomized), niter, oversample (PiSSA's initialisation)."""

    method: Literal["ba_lora"] = "ba_lora"
    lambda_consistency: float = Field(1e-4, ge=0)
    lambda_diversity: float = Field(3e-4, ge=0)
    lambda_svd: float = Field(1e-4, ge=0)
    k: int = Field(3, ge=1)
    svd: Literal["exact", "gram", "randomized"] = "randomized"
    niter: int = Field(4, ge=0)
    oversample: int = Field(10, ge=0)


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: BALoRAConfig, prepared=None):
    U, S, Vh = top_singular(linear, config.r, "ba_lora", config.svd, config.niter,
                            config.oversample, config.seed)
    A, B = balanced_split(U, S, Vh, config.scale)
    return adapted_linear(linear, A, B, config.scale, residual=True)


# -- the three regularisers --------------------------------------------------------------------
def consistency(y: torch.Tensor, y0: torch.Tensor) -> torch.Tensor:
    if y.dim() == 2:
        return F.mse_loss(F.normalize(y, dim=-1), F.normalize(y0, dim=-1))
    logp, logp0 = F.log_softmax(y, dim=-1), F.log_softmax(y0, dim=-1)
    return (logp0.exp() * (logp0 - logp)).sum() / y.shape[0]


def diversity(y: torch.Tensor) -> torch.Tensor:
    if y.dim() == 2:
        n, c = y.shape
        if n < 2:
            return y.sum() * 0
        centred = y - y.mean(dim=0)
        cov = centred.mT @ centred / (n - 1)
        return (cov - torch.diag(torch.diag(cov))).square().sum() / c
    logp = F.log_softmax(y, dim=-1)
    return (logp.exp() * logp).sum(dim=-1).mean()


def svd_concentration(y: torch.Tensor, k: int) -> torch.Tensor:
    s = torch.linalg.svdvals(y)
    k = min(k, s.shape[-1])
    return -(s[..., :k].sum(dim=-1) / (s.sum(dim=-1) + 1e-10)).mean()


def regularisers(y: torch.Tensor, y0: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """The three terms for logits ``y`` (``[b, C]`` or ``[b, t, V]``) against ``y0``, in
    float32 (float64 logits stay float64)."""
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    y, y0 = y.to(dtype), y0.to(dtype)
    return {"consistency": consistency(y, y0), "diversity": diversity(y),
            "svd": svd_concentration(y, k)}


def regulariser_loss(model: nn.Module, config: BALoRAConfig) -> torch.Tensor | None:
    """λ₁·L_consistency + λ₂·L_diversity + λ₃·L_svd on the last forward's outputs (which it
    consumes); None when no training forward was captured."""
    captured = model.__dict__.pop("ba_lora_outputs", None)
    if captured is None:
        return None
    terms = regularisers(*captured, config.k)
    return (config.lambda_consistency * terms["consistency"]
            + config.lambda_diversity * terms["diversity"] + config.lambda_svd * terms["svd"])


# -- capturing the outputs ---------------------------------------------------------------------
@contextlib.contextmanager
def pretrained(model: nn.Module):
    """The model as pre-trained: every adapted layer's low-rank part swapped for its frozen
    initial factors (base + origin = W), eval mode, no gradients."""
    layers = list(factored_layers(model).values())
    was_training = model.training
    for layer in layers:
        layer.lowrank, layer.origin = layer.origin, layer.lowrank
    model.__dict__["ba_lora_base_pass"] = True
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        model.__dict__["ba_lora_base_pass"] = False
        for layer in layers:
            layer.lowrank, layer.origin = layer.origin, layer.lowrank


def capture(model: nn.Module, args, kwargs, output):
    """Forward hook: with gradients enabled, keep ``(logits, pre-trained logits)``."""
    y = getattr(output, "logits", None)
    if (y is None or not torch.is_grad_enabled() or model.__dict__.get("ba_lora_base_pass")
            or getattr(model, "slimtune_adapter", None) is None
            or any(layer.merged for layer in factored_layers(model).values())):
        return None
    with pretrained(model):
        y0 = model(*args, **kwargs).logits
    model.__dict__["ba_lora_outputs"] = (y, y0)
    return None


def before_step(model: nn.Module, config: BALoRAConfig, step: int) -> None:
    """Register the capturing forward hook once."""
    if not any(h is capture for h in model._forward_hooks.values()):
        model.register_forward_hook(capture, with_kwargs=True)


METHODS.register("ba_lora", BALoRAConfig, init_layer=init_layer, loss=regulariser_loss,
                 before_step=before_step)
