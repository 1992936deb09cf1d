"""LoLDU (Shi et al. 2024, "LoLDU: Low-Rank Adaptation via Lower-Diag-Upper Decomposition for
Parameter-Efficient Fine-Tuning").

    W = P·L·U                  (pivoted LU, ``torch.linalg.lu``; L unit lower-trapezoidal)
    D = diag(U),  Û = D⁻¹·U    (so W = P·L·diag(D)·Û, Û unit upper-trapezoidal)
    B = P·L[:, :r],  A = Û[:r],  z₀ = D[:r]
    W' = W_base + σ·B·diag(z)·A,   W_base = W - σ·B·diag(z₀)·A,   z = z₀ at step 0

Only the diagonal z (r numbers per layer) trains; P·L_r and Û_r are frozen, and the base is the
residual of the first r LDU components, so the output at step 0 equals the original model's. The
paper reports that LoLDU "reduces trainable parameters by 2600 times compared to regular PEFT
methods while maintaining comparable performance".

σ defaults to 1/r: the reference code's ``lora_alpha / rank`` with its default ``lora_alpha =
1`` (SKDDJ/LoLDU ``minloldu/loldu.py``), so ``alpha`` and ``rslora`` are not used. A larger σ
makes base and adapter cancel more: at r = 8 on every SmolLM2 linear, σ = 4 leaves 2.6e-5
relative round-off in the step-0 logits, σ = 1/8 2.3e-6. The paper also describes σ as
trainable; the reference's training set (``name_is_loldu``) holds z alone, and so does this (a
trainable σ times a trainable z spans the same updates). A zero pivot (a singular leading block)
leaves its row of U unscaled (D⁻¹ taken as 1 there). The frozen factors are saved with the
adapter (an LU recomputed at load need not match to the last bit, and z is meaningful only with
its own factors).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from slimtune.adapt.factors import adapted_linear, init_weight
from slimtune.adapt.registry import METHODS, AdapterConfig


class LoLDUConfig(AdapterConfig):
    """``method: loldu`` -- r (LDU components adapted), targets, seed (unused: the
    decomposition is deterministic), sigma (the fixed scale σ; default 1/r); alpha and rslora are
    ignored."""

    method: Literal["loldu"] = "loldu"
    sigma: float | None = Field(None, gt=0)

    @property
    def scale(self) -> float:
        return 1.0 / self.r if self.sigma is None else self.sigma


def ldu(W: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(P, L, D, Û)`` with ``W = P·L·diag(D)·Û`` (Û with unit diagonal where D is nonzero)."""
    P, L, U = torch.linalg.lu(W)
    D = torch.diagonal(U).clone()
    U = U / torch.where(D == 0, torch.ones_like(D), D)[:, None]
    return P, L, D, U


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: LoLDUConfig, prepared=None):
    P, L, D, U = ldu(init_weight(linear, config.r, "loldu"))
    r = config.r
    return adapted_linear(linear, U[:r], P @ L[:, :r], config.scale, core=D[:r], residual=True,
                          train_A=False, train_B=False, train_core=True)


METHODS.register("loldu", LoLDUConfig, init_layer=init_layer)
