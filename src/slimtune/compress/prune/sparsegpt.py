"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot").

With ``H = 2·XᵀX/n`` of the layer's calibration inputs (on the already-compressed earlier blocks)
and the upper Cholesky factor ``U`` of the damped ``H⁻¹``, the columns are swept in blocks of
``block_size``: at the start of each block the mask is chosen by the OBS saliency
``w² / U_jj²`` (the lowest ``sparsity`` fraction of the block's entries, or the lowest ``M - N``
of every M columns of a row for N:M), then each column is fixed (pruned entries to 0) and its
error is pushed onto the columns not yet fixed -- the loop GPTQ shares
(:func:`slimtune.weights.obs.sparsegpt`). Damping ``damp`` (relative, default 0.01) is raised
automatically when the Cholesky fails and recorded per layer.

Statistics order: the step asks the pipeline for ``sequential="block"`` (every layer's ``H`` on
the block as it was, as the reference code and llm-compressor take it). Over three calibration
seeds on SmolLM2-135M at 50% that order is within +0.3% of llm-compressor on PTB and Austen,
where the one-forward "layer" order is 1.2% better on PTB but 1.9% worse on Austen
(BENCHMARKS.md, Compression II). It also allows ``stats_precision="bfloat16"``: where the
hardware multiplies bfloat16 natively, the statistics forward runs on a bfloat16 copy of the
block and the Gram's products take bfloat16 inputs with float32 accumulation, while the outputs
forward stays float32 (the layers' errors on real blocks move by at most 2%;
``tests/test_pipeline_precision.py``).

Reported (METHODS.md): LLaMA-2-7B WikiText-2 6.51 at 50%, 10.17 at 2:4 (dense 5.12); OPT-125M
50% 36.85 vs magnitude 193 (dense 27.66).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimtune.compress.hessian_factors import HessianFactors
from slimtune.compress.prune.common import PruneConfig, PruneStep, check_layer
from slimtune.compress.registry import METHODS
from slimtune.weights.obs import sparsegpt

NEEDS = frozenset({"gram"})


class SparseGPTConfig(PruneConfig):
    """``method: sparsegpt`` -- targets, sparsity, pattern, block_size, damp."""

    method: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(128, ge=1, description="columns per mask-selection / lazy-update "
                            "block (a multiple of M for N:M)")
    damp: float = Field(0.01, gt=0, lt=1, description="relative damping of H, raised "
                        "automatically when its Cholesky fails")

    @model_validator(mode="after")
    def _block_multiple(self):
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            raise ValueError(f"block_size: {self.block_size} is not a multiple of M={nm[1]} "
                             f"of the pattern {self.pattern!r}")
        return self


def build(config: SparseGPTConfig) -> PruneStep:
    nm = config.nm
    factors = HessianFactors(config.damp)  # shared by layers of one input

    def prune(name, W, stats):
        inputs = getattr(stats, "inputs", None)
        if inputs is None or inputs.gram_sum is None:
            raise ValueError("sparsegpt needs the input Gram matrix X^T X (needs={'gram'})")
        f = factors.get(inputs, W.device)
        result = sparsegpt(W, f.H, None if nm else config.fraction, nm, config.block_size,
                           config.damp, factor=f)
        return result.weight, result.mask, {"damp": result.damp_used, "loss": result.error}

    return PruneStep("sparsegpt", config, NEEDS, prune, sequential="block",
                     stats_precision="bfloat16")


METHODS.register("sparsegpt", SparseGPTConfig, build=build, check_layer=check_layer)
