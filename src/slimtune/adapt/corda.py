"""CorDA (Yang et al. 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language
Models for Task-Aware Parameter-Efficient Fine-tuning").

Per target layer, with ``C`` the covariance of its inputs over the calibration tokens:

    C_d = C + lam·mean(diag C)·I     (lam = 0.01, doubled until ||C_d·C_d⁻¹ - I||_F < 0.05)
    W·C_d = U·S·Ĥᵀ,   V = (Ĥ·C_d⁻¹)ᵀ     (so U·S·Vᵀ = W: a context-oriented decomposition of W)
    ipm: the top-r components;  kpm: the last r components
    A = sqrt(S_r/s)·V_rᵀ,  B = U_r·sqrt(S_r/s),  W_base = W - s·B·A

IPM ("instruction-previewed") adapts the components that the task data excites most; KPM
("knowledge-preserved") takes ``C`` from knowledge data (e.g. QA questions), freezes the components
that data relies on and adapts the least used ones. The output at step 0 equals the original
model's. The paper reports Llama-2-7B GSM8K: IPA 54.59, KPA 45.64, LoRA 42.68.

Memory: the covariances are streamed layer by layer through :func:`slimtune.calib.run_pipeline`
(one block's input statistics at a time; layers fed the same input share them); only the rank-r
factors of each layer are kept. Targets outside the block list (a BERT pooler) get theirs from one
hooked forward pass over ``calib`` (only those layers' statistics).

Differences from PEFT's ``init_lora_weights="corda"``:

- ``C`` here is ``XᵀX / tokens`` over all calibration tokens. PEFT divides each batch's input by
  the batch's max before the Gram and averages the Grams over batches. The damping criterion,
  ``U``, ``S·Vᵀ`` and hence ``s·B·A`` and ``W_base`` are invariant to a uniform scale ``c`` of
  ``C``, but the split is not: ``A ∝ c^(-1/2)``, ``B ∝ c^(1/2)``. With one calibration batch the
  two therefore give the same adapter product and base, with A and B differing by one scalar per
  layer; with several batches PEFT's per-batch normalisation also reweights the batches.
- ``precision`` (default float32, as PEFT) is the dtype of the damping loop and the SVD; the
  criterion measures the inversion error, so float64 may stop at less damping. ``C_d`` can be
  conditioned up to ~1e5, so float32 factors carry ~1e-3 relative error (two float32 runs on
  covariances differing in the last bits, e.g. ours and PEFT's, differ by that much). For kpm
  the last components of ``W·C_d`` can lie below float32 resolution (1e-9 of the first on
  SmolLM2's q_proj): their directions are then noise, in PEFT as here; use ``precision:
  float64`` for kpm.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.calib import LayerStats, find_blocks, run_pipeline
from slimtune.weights.covariance import covariance_svd, damped_inverse
from slimtune.weights.stats import InputStatistics
from slimtune.weights.svd import balanced_split


class CorDAConfig(AdapterConfig):
    """``method: corda`` -- r, alpha, targets, rslora, seed; mode (ipm: adapt the top-r context
    components | kpm: adapt the last r), precision of the damping and SVD, batch_size (windows per
    forward while collecting covariances)."""

    method: Literal["corda"] = "corda"
    mode: Literal["ipm", "kpm"] = "ipm"
    precision: Literal["float32", "float64"] = "float32"
    batch_size: int = Field(8, ge=1)


@dataclass
class CorDAFactors:
    """The kept components of one layer: ``U [out, r]``, ``S [r]``, ``V [in, r]``; ``damping`` is
    the final ``lam``."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    damping: float


def context_factors(W: torch.Tensor, C: torch.Tensor, config: CorDAConfig) -> CorDAFactors:
    """Damp ``C``, decompose ``W·C_d``, keep the top (ipm) or last (kpm) ``r`` components."""
    dtype = torch.float64 if config.precision == "float64" else torch.float32
    C_d, C_inv, lam = damped_inverse(C.to(dtype))
    U, S, V = covariance_svd(W, C_d, C_inv)
    keep = slice(0, config.r) if config.mode == "ipm" else slice(S.numel() - config.r, None)
    return CorDAFactors(U[:, keep].clone(), S[keep].clone(), V[:, keep].clone(), lam)


class ContextSVDStep:
    """Pipeline step: reads each layer's input Gram, stores its rank-r factors, changes nothing."""

    needs = frozenset({"gram"})

    def __init__(self, targets: list[str], config: CorDAConfig):
        self.targets, self.config, self.factors = targets, config, {}

    def apply(self, name: str, layer: nn.Module, stats: LayerStats) -> nn.Module:
        C = stats.inputs.gram() / stats.inputs.n_tokens
        self.factors[name] = context_factors(layer.weight, C, self.config)
        return layer


def _add_input(stats: InputStatistics, module, args) -> None:
    stats.update(args[0])


@torch.no_grad()
def _hooked_covariances(model: nn.Module, names: list[str], calib: torch.Tensor,
                        batch_size: int) -> dict[str, torch.Tensor]:
    """Input covariances of ``names`` from one hooked forward pass over ``calib``."""
    stats, handles = {}, []
    for name in names:
        layer = model.get_submodule(name)
        stats[name] = InputStatistics(layer.in_features, device=layer.weight.device)
        handles.append(layer.register_forward_pre_hook(partial(_add_input, stats[name])))
    was_training = model.training
    model.eval()
    try:
        calib = calib.to(next(model.parameters()).device)
        for s in range(0, len(calib), batch_size):
            model(input_ids=calib[s:s + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: st.covariance() for name, st in stats.items()}


def prepare(model: nn.Module, names: list[str], config: CorDAConfig,
            calib: torch.Tensor, progress: bool = True) -> dict[str, CorDAFactors]:
    for name in names:
        W = model.get_submodule(name).weight
        if config.r > min(W.shape):
            raise ValueError(f"corda: r={config.r} exceeds min(out, in) = {min(W.shape)} of {name}")
    prefix, _ = find_blocks(model)
    inside = [n for n in names if n.startswith(prefix + ".")]
    outside = [n for n in names if not n.startswith(prefix + ".")]
    factors = {}
    if inside:
        step = ContextSVDStep(inside, config)
        run_pipeline(model, calib, [step], batch_size=config.batch_size, progress=progress)
        factors.update(step.factors)
    if outside:
        for name, C in _hooked_covariances(model, outside, calib, config.batch_size).items():
            factors[name] = context_factors(model.get_submodule(name).weight, C, config)
    return factors


def init_layer(name: str, linear: nn.Linear, config: CorDAConfig, prepared: CorDAFactors | None):
    if prepared is None:
        raise ValueError(f"corda: no covariance factors for {name}; use slimtune.adapt.apply "
                         "with calib=")
    A, B = balanced_split(prepared.U, prepared.S, prepared.V.mT, config.scale)
    return adapted_linear(linear, A, B, config.scale, residual=True)


METHODS.register("corda", CorDAConfig, init_layer=init_layer, prepare=prepare)
