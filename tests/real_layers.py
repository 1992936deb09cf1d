"""Pieces of the real SmolLM2 the method tests share (not a test module): copies of layer 0's
projections, and the model cut to its first blocks (a fast training loop on real weights)."""
from __future__ import annotations

import copy

from torch import nn

NAMES = ["q_proj", "v_proj", "gate_proj"]


def layer0_copies(block0) -> nn.ModuleDict:
    """Fresh copies of layer 0's q_proj (576x576), v_proj (192x576) and gate_proj (1536x576)."""
    return nn.ModuleDict({"q_proj": copy.deepcopy(block0.self_attn.q_proj),
                          "v_proj": copy.deepcopy(block0.self_attn.v_proj),
                          "gate_proj": copy.deepcopy(block0.mlp.gate_proj)})


def first_blocks(model: nn.Module, n: int) -> nn.Module:
    """A separate copy of ``model`` with only its first ``n`` decoder blocks (the original is
    left whole; only the kept blocks are copied)."""
    blocks = model.model.layers
    model.model.layers = blocks[:n]
    try:
        cut = copy.deepcopy(model)
    finally:
        model.model.layers = blocks
    cut.config.num_hidden_layers = n
    return cut
