"""OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models").

    W = Q·R (QR of W [out, in]);   B = Q[:, :r],  A = R[:r];   W_base = W - s·B·A

B starts orthonormal (the first r columns of Q) and A holds the matching rows of R; the frozen
base is the residual, so the output at step 0 equals the original model's. This is PEFT's
``init_lora_weights="olora"``: the factors are not divided by the scale, so the base is
``W - s·Q_r·R_r`` (with ``s != 1`` the base is not the "remaining" part of the QR). The paper
reports faster convergence and better final accuracy than LoRA on several LLMs; METHODS.md lists
no number. The QR runs in float32 (float64 for float64 weights).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from slimtune.adapt.factors import adapted_linear, init_weight
from slimtune.adapt.registry import METHODS, AdapterConfig


class OLoRAConfig(AdapterConfig):
    """``method: olora`` -- r, alpha, targets, rslora, seed (unused: QR is deterministic)."""

    method: Literal["olora"] = "olora"


def qr_factors(linear: nn.Linear, r: int):
    """``(A, B) = (R[:r], Q[:, :r])`` of the reduced QR of the weight."""
    W = init_weight(linear, r, "olora")
    Q, R = torch.linalg.qr(W)
    return R[:r].clone(), Q[:, :r].clone()


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: OLoRAConfig, prepared=None):
    A, B = qr_factors(linear, config.r)
    return adapted_linear(linear, A, B, config.scale, residual=True)


METHODS.register("olora", OLoRAConfig, init_layer=init_layer)
