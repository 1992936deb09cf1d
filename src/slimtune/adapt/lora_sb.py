"""LoRA-SB (Ponkshe et al. 2024, "Initialization using Update Approximation is a Silver Bullet
for Extreme Efficient Low-Rank Fine-Tuning").

    G = ∇_W L(W; calibration windows)           (the full fine-tuning gradient of every target)
    ΔW₁ = -η·sign(G)                             (Adam's first update; ``update: gradient``: -η·G)
    ΔW₁ ≈ U_r·diag(S_r)·V_rᵀ                     (truncated SVD)
    B = U_r,  R₀ = diag(S_r),  A = V_rᵀ;   W' = W_base + B·R·A,   W_base = W - B·R₀·A

LoRA-XS's architecture (B and A frozen, only the r x r matrix R trains: r² numbers per layer)
initialised so that B·R₀·A is the best rank-r approximation of the first full fine-tuning step:
the trained update starts in the subspace full fine-tuning would move in first. There is no
scaling factor (s = 1; ``alpha`` and ``rslora`` are accepted but not used), the paper's point
being that this initialisation fixes the scale. The paper reports "27-90 times fewer learnable
parameters" than LoRA with better accuracy, and that it beats LoRA-XS throughout.

As the reference code (RaghavSinghal10/lora-sb, ``estimate_and_process_grads_torch`` and
``find_and_initialize_grad``): G is summed over the calibration batches, the update is
``-lr·sign(G)`` with the first warmup step's learning rate (``update_lr`` here), B = U, A = Vᵀ
and the latent R = diag(S). Differences: the reference starts training at W + B·R₀·A (one
simulated step); here the base is W - B·R₀·A so the output at step 0 is the original model's
(``start: update`` gives the reference's start). The SVD is exact or randomized (the reference:
``torch.svd_lowrank`` with 10 power iterations, this default). The model runs in eval mode
(no dropout) for the gradient. Its loss is the next-token cross-entropy of a causal LM on the
windows; a model without a language-model head (an encoder, a classifier over one: the windows
carry no labels) gets the label-free ``Σ mean(y²) / 2`` over its outputs (logits; or last hidden
state and pooled output). A target the output does not depend on (BERT's pooler under a
mean-pooling head) gets no gradient: its B and A are the top-r singular pairs of W and R₀ = 0,
so it stays exact and trains like LoRA-XS. ``update_lr`` defaults to 1e-2: with the exact start R₀'s scale only
decides what weight decay pulls R towards (set it to the first step's learning rate with
``start: update``).

Memory: one gradient per target weight (as full fine-tuning) during ``prepare``; the frozen B, A
and the initial R are saved with the adapter (recomputing them would need the same gradient).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.models import is_causal_lm
from slimtune.progress import progress_bar
from slimtune.weights.precision import compute_dtype
from slimtune.weights.svd import randomized_svd, truncated_svd


class LoRASBConfig(AdapterConfig):
    """``method: lora_sb`` -- r, targets, seed; update (sign: Adam's first step | gradient: SGD's),
    update_lr (its step size), start (base: the original model's output | update: W + B·R₀·A,
    the reference's), batch_size (windows per forward), svd (exact | randomized), niter,
    oversample; alpha and rslora are ignored (no scaling)."""

    method: Literal["lora_sb"] = "lora_sb"
    update: Literal["sign", "gradient"] = "sign"
    update_lr: float = Field(1e-2, gt=0)
    start: Literal["base", "update"] = "base"
    batch_size: int = Field(4, ge=1)
    svd: Literal["exact", "randomized"] = "randomized"
    niter: int = Field(10, ge=0)
    oversample: int = Field(10, ge=0)

    @property
    def exact_start(self) -> bool:
        return self.start == "base"


def first_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The loss whose gradient stands for the first fine-tuning step (see the module docstring)."""
    if is_causal_lm(model):
        logits = model(input_ids=ids, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    out = model(input_ids=ids)
    outputs = out.to_tuple() if hasattr(out, "to_tuple") else (out,)
    return sum(0.5 * y.float().square().mean() for y in outputs
               if isinstance(y, torch.Tensor) and y.is_floating_point())


def first_update(G: torch.Tensor, config: LoRASBConfig) -> torch.Tensor:
    return -config.update_lr * (G.sign() if config.update == "sign" else G)


def update_svd(update: torch.Tensor, config: LoRASBConfig):
    if config.svd == "exact":
        return truncated_svd(update, config.r)
    return randomized_svd(update, config.r, oversample=config.oversample, n_iter=config.niter,
                          seed=config.seed)


def prepare(model: nn.Module, names: list[str], config: LoRASBConfig, calib: torch.Tensor,
            progress: bool = True) -> dict:
    """``{name: (U_r, S_r, V_rᵀ)}`` of each target's first update, from the gradient summed over
    ``calib`` (each batch's mean loss weighted by its share of the windows)."""
    weights = {n: model.get_submodule(n).weight for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    calib = calib.to(next(model.parameters()).device)
    starts = range(0, len(calib), config.batch_size)
    model.eval()
    model.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        bar, task = progress_bar(len(starts), f"lora_sb: gradient of {len(names)} layers",
                                 progress)
        with bar:
            for s in starts:
                ids = calib[s:s + config.batch_size]
                (first_loss(model, ids) * (len(ids) / len(calib))).backward()
                bar.advance(task)
        result = {}
        with torch.no_grad():
            for name, w in weights.items():
                if w.grad is None:  # unused by the output: W's own top-r pairs, R₀ = 0
                    U, S, Vh = update_svd(w.detach().to(compute_dtype(w)), config)
                    result[name] = (U, torch.zeros_like(S), Vh)
                    continue
                update = first_update(w.grad.to(compute_dtype(w)), config)
                w.grad = None
                result[name] = update_svd(update, config)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return result


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: LoRASBConfig, prepared=None):
    if prepared is None:
        raise ValueError(f"lora_sb: no first update for {name}; use slimtune.adapt.apply with "
                         "calib=")
    U, S, Vh = prepared
    return adapted_linear(linear, Vh, U, 1.0, core=torch.diag(S), residual=config.start == "base",
                          train_A=False, train_B=False, train_core=True)


METHODS.register("lora_sb", LoRASBConfig, init_layer=init_layer, prepare=prepare)
