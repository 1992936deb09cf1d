"""FSAM (Zhong et al., Findings of EMNLP 2022, "Improving Sharpness-Aware Minimization with
Fisher Mask for Better Generalization on Language Models"): SAM whose perturbation is sparse,
only on the parameters with the largest Fisher information, so the optimiser focuses on the
important ones. With g = ∇L(w) (global norm over the trainable parameters):

    F = g ⊙ g                       (empirical Fisher, diagonal, of the step's batch)
    m = 1 on the round((1 − s)·d) entries of largest F over all d trainable entries, else 0
        (recomputed every ``mask_interval`` steps, from the first step on; kept in between)
    ε = ρ · (g / ‖g‖) ⊙ m           (SAM's ε, masked: entries outside m are not moved)

then g' = ∇L(w + ε) on the same batch, and the base optimiser steps from w with g' (as
:mod:`.sam`; ``base``, ``base_params`` and the AdamW keys pass through). The mask is one bool
tensor per parameter in the optimiser's state (``state_dict`` holds it, with the step count,
beside the base's state), so a resumed run perturbs exactly as an unbroken one.

Defaults: sparsity s = 0.9 and a mask refreshed every 100 steps (the authors' code,
WHU-ZQH/FSAM4PLM: keep_ratio 0.1, ``--mask-iter-e 100``), ρ = 0.05. As in that code, ‖g‖ is
the norm of the whole gradient (masking after normalising), the Fisher is the squared gradient
of the current step's batch, and the top-k is global across parameters. Two of its quirks are
not followed: it leaves biases and embeddings out of the mask (and perturbs them fully), and on
a step that refreshes the mask it clears the gradient before perturbing (so that step is not
perturbed). Reported (METHODS.md / abstract): FSAM beats SAM by 0.67~1.98 average GLUE /
SuperGLUE points over four pretrained models, by up to 15.1 with little training data.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch
from pydantic import Field

from slimtune.train.optimizers.registry import OPTIMIZERS
from slimtune.train.optimizers.wrapper import (Wrapper, WrapperKeys, base_conflict, build_base,
                                              global_norm)


class FSAMConfig(WrapperKeys):
    method: Literal["fsam"] = "fsam"
    rho: float = Field(0.05, gt=0, description="radius of the weight perturbation")
    sparsity: float = Field(0.9, ge=0, lt=1, description="fraction of the entries left out of "
                                                         "the perturbation (smallest Fisher)")
    mask_interval: int = Field(100, ge=1, description="recompute the Fisher mask every N steps")


def fisher_masks(grads: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Bool masks shaped as ``grads``: True on the ``round((1 − sparsity)·d)`` entries (at least
    one) of largest ``g²`` among all ``d`` entries of all ``grads``."""
    device = grads[0].device
    fisher = torch.cat([g.detach().float().square().flatten().to(device) for g in grads])
    keep = max(1, round(fisher.numel() * (1 - sparsity)))
    flat = torch.zeros(fisher.numel(), dtype=torch.bool, device=device)
    flat[fisher.topk(keep, sorted=False).indices] = True
    return [m.view(g.shape).to(g.device) for m, g in
            zip(flat.split([g.numel() for g in grads]), grads)]


class FSAM(Wrapper):
    """Wraps ``base`` (:class:`~.wrapper.Wrapper`: its parameter groups and state), and keeps
    the Fisher mask in its own state (``self.state[p]["fisher_mask"]``)."""

    def __init__(self, base: torch.optim.Optimizer, rho: float, sparsity: float,
                 mask_interval: int):
        super().__init__(base, {"rho": rho})
        self.sparsity, self.mask_interval, self.steps = sparsity, mask_interval, 0

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        self.check_closure(closure, "fsam", "two")
        pairs = self.pairs()
        if self.steps % self.mask_interval == 0:
            for p in self.params():
                self.state[p].pop("fisher_mask", None)
            masks = fisher_masks([p.grad for p, _ in pairs], self.sparsity)
            for (p, _), m in zip(pairs, masks):
                self.state[p]["fisher_mask"] = m
        self.steps += 1
        norm = global_norm(p.grad for p, _ in pairs) + 1e-12
        moved = []
        for p, group in pairs:
            mask = self.state[p].get("fisher_mask")
            if mask is None:  # had no gradient when the mask was made: not perturbed
                continue
            moved.append((p, torch.where(mask, p.grad * (group["rho"] / norm), 0.0)))
        return self.step_at(moved, closure)

    def state_dict(self):
        index = {id(p): i for i, p in enumerate(self.params())}
        masks = {index[id(p)]: s["fisher_mask"] for p, s in self.state.items()
                 if "fisher_mask" in s}
        return {**self.base.state_dict(), "fsam": {"steps": self.steps, "masks": masks}}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        own = state_dict.pop("fsam", None)
        if own is None:
            raise ValueError("not an fsam optimizer state: it has no 'fsam' entry (the Fisher "
                             "mask and step count)")
        super().load_state_dict(state_dict)
        params = self.params()
        self.steps = int(own["steps"])
        self.state = defaultdict(dict)
        for i, mask in own["masks"].items():
            p = params[int(i)]
            self.state[p]["fisher_mask"] = mask.to(device=p.device, dtype=torch.bool)


def build(model: torch.nn.Module, config: FSAMConfig) -> torch.optim.Optimizer:
    return FSAM(build_base(model, config), config.rho, config.sparsity, config.mask_interval)


OPTIMIZERS.register("fsam", FSAMConfig, build=build, conflict=base_conflict)
