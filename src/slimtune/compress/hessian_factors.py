"""One Hessian factor per calibration-statistics object, for the steps that sweep with it.

Linears fed the very same tensor (q/k/v, gate/up in a LLaMA block) share one
:class:`~slimtune.weights.stats.InputStatistics` (:class:`slimtune.calib.SameInput`), hence one
``H = 2XᵀX/n``. GPTQ and SparseGPT steps ask this cache instead of building ``H``, the act-order
permutation and the inverse Cholesky factor once per layer
(:func:`slimtune.weights.obs.hessian_factor`). Entries are keyed weakly by the statistics object
and carry its token count, so a factor never outlives its statistics nor serves updated ones.
"""
from __future__ import annotations

import weakref

import torch

from slimtune.weights.hessian import layer_hessian
from slimtune.weights.obs import HessianFactor, hessian_factor


class HessianFactors:
    """``get(inputs, device)``: the factor of ``inputs``' Hessian at this ``damp``/``act_order``."""

    def __init__(self, damp: float, act_order: bool = False):
        self.damp, self.act_order = damp, act_order
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, inputs, device: torch.device) -> HessianFactor:
        hit = self._cache.get(inputs)
        if hit is None or hit[0] != inputs.n_tokens or hit[1].U.device != device:
            H = layer_hessian(inputs.gram(), inputs.n_tokens)
            hit = (inputs.n_tokens, hessian_factor(H, self.damp, self.act_order, device))
            self._cache[inputs] = hit
        return hit[1]
