"""DSEE (Chen, Cheng, Gan, Gan, Wang, Liu 2023, "DSEE: Dually Sparsity-embedded Efficient Tuning
of Pre-trained Language Models"), its sparsity-embedded update (and, optionally, its sparse
final weight).

    W ≈ L + S'  (GoDec: L = rank-q SVD of W - S', S' = the N largest |W - L|, alternated from 0)
    Ω = the support of S'                                    (the entries low rank cannot explain)
    W' = W ⊙ M + s·B·A + S,   S = Σ_{(i,j) ∈ Ω} v_ij·e_i·e_jᵀ,   s = alpha / r
    A [r, in] ~ U(-1/√in, 1/√in),  B = 0,  v = 0;  A, B and v train;  M = 1 (see ``prune``)

The paper decomposes each pretrained weight into low-rank plus sparse with GreBsmo and tunes the
sparse update at the N positions of the largest entries of the sparse residual, next to a LoRA
update; it reports "about 25% inference FLOPs" saved "with 0.5% trainable parameters" on BERT
(with its sparse final weight). ``select`` picks Ω: ``residual`` (default, the decomposition
above), ``magnitude`` (the N largest |W|) or ``random`` (its ablation; seeded per layer). N is
``n_sparse`` entries per layer, 128 as the reference code's ``num_sparse`` default.

``prune`` > 0 is the optional sparse final weight: the ``prune`` fraction of W's entries with the
smallest magnitude is masked (M, the layer's base mask, saved with the adapter) from the start,
so the start is not the base model's (``exact_start`` is false); default 0.

Differences from the paper and the reference code (VITA-Group/DSEE, ``run_glue.py``). GreBsmo
grows the rank of L by 5 per round for 100 rounds with a hard threshold 0.01 on S'; here L has a
fixed rank ``decompose_rank`` (default 16) from randomized SVDs, S' keeps exactly N entries, and
``decompose_iters`` (default 2) rounds alternate. The reference multiplies S by alpha/r too
(s·(B·A + S)); here S is unscaled as ΔW = s·B·A + S (with Adam the same as an alpha/r-times
smaller learning rate on v), and v starts at 0 so the start is exact. DSEE prunes the tuned
weight W + ΔW and tunes again; ``prune`` masks the pretrained weight before tuning instead.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.adapt.factors import adapted_linear, kaiming_uniform_A, layer_generator
from slimtune.adapt.registry import METHODS, AdapterConfig
from slimtune.layers import SparseDelta
from slimtune.weights.precision import compute_dtype
from slimtune.weights.sparse_support import random_support, sparse_outliers
from slimtune.weights.sparsity import layer_mask, magnitude_scores


class DSEEConfig(AdapterConfig):
    """``method: dsee`` -- r, alpha, targets, rslora, seed, n_sparse (sparse entries per layer,
    >= 1), select (residual | magnitude | random: how Ω is chosen), decompose_rank (q, the rank
    of the low-rank part removed before choosing, >= 1), decompose_iters (GoDec rounds, >= 1),
    prune (fraction of the pretrained weight masked by magnitude, [0, 1); 0: none)."""

    method: Literal["dsee"] = "dsee"
    n_sparse: int = Field(128, ge=1)
    select: Literal["residual", "magnitude", "random"] = "residual"
    decompose_rank: int = Field(16, ge=1)
    decompose_iters: int = Field(2, ge=1)
    prune: float = Field(0.0, ge=0, lt=1)

    @property
    def exact_start(self) -> bool:
        return self.prune == 0


def check_layer(config: DSEEConfig, name: str, linear: nn.Linear) -> None:
    n_out, n_in = linear.weight.shape
    if config.n_sparse > n_out * n_in:
        raise ValueError(f"dsee: n_sparse={config.n_sparse} exceeds the {n_out * n_in} entries "
                         f"of {name} ({n_out}x{n_in})")
    if config.select == "residual" and config.decompose_rank > min(n_out, n_in):
        raise ValueError(f"dsee: decompose_rank={config.decompose_rank} exceeds min(out, in) = "
                         f"{min(n_out, n_in)} of {name}")


def sparse_positions(name: str, W: torch.Tensor, config: DSEEConfig) -> torch.Tensor:
    """Ω as sorted flat indices (see ``select``)."""
    if config.select == "random":
        g = layer_generator(config.seed, f"{name}/dsee")
        return random_support(W.numel(), config.n_sparse, g)
    rank = config.decompose_rank if config.select == "residual" else 0
    return sparse_outliers(W, config.n_sparse, rank, config.decompose_iters, config.seed)


@torch.no_grad()
def init_layer(name: str, linear: nn.Linear, config: DSEEConfig, prepared=None):
    check_layer(config, name, linear)
    W = linear.weight
    dtype = compute_dtype(W)
    A = kaiming_uniform_A(config.r, W.shape[1], layer_generator(config.seed, name), dtype, "cpu")
    B = torch.zeros(W.shape[0], config.r, dtype=dtype)
    layer = adapted_linear(linear, A.to(W.device), B.to(W.device), config.scale)
    indices = sparse_positions(name, W, config).to(W.device)
    layer.sparse = SparseDelta(tuple(W.shape), indices,
                               torch.zeros(indices.numel(), dtype=W.dtype, device=W.device))
    if config.prune > 0:
        layer.set_mask(layer_mask(magnitude_scores(W), config.prune))
    return layer


METHODS.register("dsee", DSEEConfig, init_layer=init_layer, check_layer=check_layer)
