"""MiSS (Kang & Yin 2025, "MiSS: Balancing LoRA Performance and Efficiency with Simple Shard
Sharing"; the successor of Bone, "Block Affine Transformation as Parameter Efficient
Fine-tuning Methods for Large Language Models"). PEFT 0.21's ``MissConfig`` semantics.

    y = x·Wᵀ + (Σ_k x_k)·D,   x = [x_1 | x_2 | ... ] in blocks of r (zero-padded),  D [r, out]

i.e. ΔW = Dᵀ·[I_r I_r ... I_r]: one trainable shard D is shared by every width-r block of the
input, so the update costs a block sum and one r × out product. D starts at 0 (the output at step
0 is the base model's). ``mini_r`` (PEFT's ``init_weights="mini"``) shares D's columns too: D is
``[r, mini_r]`` repeated out/mini_r times (``mini_r`` must divide the output size). There is no
scaling (``alpha`` is unused). Bone's paper reports Llama-2-7B GSM8K 49.36, "outperforming PISSA
by 5.84%"; MiSS reports better accuracy than LoRA at lower memory and time.

Not implemented: PEFT's ``init_weights="bat"`` (Bone's earlier weight-guided update, per r × r
block ``W_ji ← W_ji + W_ji·D_j + D_j``). Its update is a function of the base weight itself, not a
part added beside it: every forward forms the whole dense weight (PEFT does), it cannot sit on a
packed quantised base (PEFT refuses those too), and unmerging needs ``(I + D_j)⁻¹``. MiSS's paper
makes the shard-sharing form above its method; ``bat`` stays PEFT's alternative.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import DenseBase, FactoredLinear, TiledLowRank


class MiSSConfig(AdapterConfig):
    """``method: miss`` -- r (the shard's rows: the input block size, at most in), targets,
    mini_r (None: D is r x out; else r x mini_r, shared along the output)."""

    method: Literal["miss"] = "miss"
    mini_r: int | None = Field(None, ge=1)

    def rank_limit(self, n_out: int, n_in: int) -> int:
        return n_in


def check_layer(config: MiSSConfig, name: str, linear: nn.Linear) -> None:
    if config.mini_r is not None and linear.out_features % config.mini_r:
        raise ValueError(f"miss: mini_r={config.mini_r} does not divide the output size "
                         f"{linear.out_features} of {name}")


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: MiSSConfig, prepared=None):
    check_layer(config, name, linear)
    W = linear.weight
    n_out, n_in = W.shape
    D = torch.zeros(config.r, config.mini_r or n_out, dtype=W.dtype, device=W.device)
    bias = None if linear.bias is None else linear.bias.data
    return FactoredLinear(n_in, n_out, base=DenseBase(W.data), lowrank=TiledLowRank(n_in, n_out, D),
                          bias=bias)


METHODS.register("miss", MiSSConfig, init_layer=init_layer, check_layer=check_layer)
