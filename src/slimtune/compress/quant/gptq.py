"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers").

With ``H = 2·XᵀX/n`` of the layer's calibration inputs (taken on the already-compressed earlier
blocks), columns are quantised one at a time and each one's error is pushed onto the columns not
yet quantised through the upper Cholesky factor of ``H⁻¹``, in blocks of ``block_size`` columns
with lazy batch updates (:func:`slimtune.weights.obs.gptq`, the loop SparseGPT shares). The grid
of every (row, group) is fixed from the original weight before the solve (as llm-compressor
does); ``act_order`` sweeps columns by descending ``diag(H)`` while the groups stay the natural
contiguous ones (static groups), so the stored integers need no column permutation. The
pruned entries of an already pruned layer (``keep``) are held at zero and their error is pushed
on like any other (SparseGPT's joint sparsity + quantisation). The relative damping ``damp``
(default 0.01) is raised automatically when the Cholesky fails; each
layer's damping is in the step's report.

Reported (METHODS.md): LLaMA-7B WikiText-2 perplexity 6.09 at 4 bits, 8.07 at 3 bits, 6.61 at
3-bit g128 (dense 5.68; RTN 6.29 / 25.54); OPT-125M 4-bit 31.12 vs RTN 37.28 (dense 27.65).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimtune.compress.hessian_factors import HessianFactors
from slimtune.compress.quant.common import QuantConfig, QuantStep, check_layer
from slimtune.compress.registry import METHODS
from slimtune.weights.obs import gptq

NEEDS = frozenset({"gram"})


class GPTQConfig(QuantConfig):
    """``method: gptq`` -- targets, bits, group_size, sym, act_order, damp, block_size."""

    method: Literal["gptq"] = "gptq"
    act_order: bool = Field(False, description="sweep columns by descending diag(H) (static "
                            "groups: the stored integers keep the natural column order)")
    damp: float = Field(0.01, gt=0, lt=1, description="relative damping of H, raised "
                        "automatically when its Cholesky fails")
    block_size: int = Field(128, ge=1, description="columns per lazy-update block")


def build(config: GPTQConfig) -> QuantStep:
    factors = HessianFactors(config.damp, config.act_order)  # shared by layers of one input

    def quantise(W, stats, spec, keep):
        inputs = getattr(stats, "inputs", None)
        if inputs is None or inputs.gram_sum is None:
            raise ValueError("gptq needs the input Gram matrix X^T X (needs={'gram'})")
        f = factors.get(inputs, W.device)
        result = gptq(W, f.H, spec, config.block_size, config.act_order, config.damp, keep=keep,
                      factor=f)
        return result.q, result.grid, {"damp": result.damp_used, "loss": result.error}

    return QuantStep("gptq", config, NEEDS, quantise)


METHODS.register("gptq", GPTQConfig, build=build, check_layer=check_layer)
