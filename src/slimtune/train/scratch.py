"""Models built from a config for pretraining from scratch (``slimtune pretrain``).

:class:`ArchConfig` describes a small Llama (the GaLore paper's LLaMA-60M family): ``hidden``
width, ``layers`` blocks, ``heads`` attention heads (``kv_heads`` for grouped-query attention),
an MLP of ``intermediate`` units (default 8/3·hidden rounded up to a multiple of 64, the LLaMA
ratio), rotary positions up to ``max_positions``, input and output embeddings tied (as
SmolLM2), RMSNorm. The vocabulary is the tokenizer's (SmolLM2's: 49,152 tokens).
:func:`build_model` draws the weights from ``torch.manual_seed(seed)`` with transformers' own
initialiser (normal, std ``initializer_range`` = 0.02), so the same config and seed always give
the same model -- a resumed run rebuilds the base it started from.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class ArchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Literal["llama"] = "llama"
    hidden: int = Field(384, ge=8, description="model width")
    layers: int = Field(6, ge=1, description="transformer blocks")
    heads: int = Field(6, ge=1, description="attention heads")
    kv_heads: int | None = Field(None, ge=1, description="key/value heads (default: heads)")
    intermediate: int | None = Field(None, ge=1, description="MLP width (default 8/3·hidden, "
                                                             "rounded up to a multiple of 64)")
    max_positions: int = Field(2048, ge=2, description="longest sequence (rotary positions)")
    seed: int = Field(0, description="seeds the initial weights")

    @model_validator(mode="after")
    def _shapes(self) -> "ArchConfig":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if (self.hidden // self.heads) % 2:
            raise ValueError(f"the head width hidden/heads = {self.hidden // self.heads} must "
                             "be even (rotary embeddings rotate pairs)")
        if self.heads % self.kv_width:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads "
                             f"({self.kv_width})")
        return self

    @property
    def kv_width(self) -> int:
        return self.kv_heads or self.heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate or 64 * math.ceil(8 * self.hidden / 3 / 64)


def hf_config(arch: ArchConfig, tokenizer):
    """The transformers ``LlamaConfig`` of ``arch`` with ``tokenizer``'s vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch.hidden, intermediate_size=arch.mlp_width,
        num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_width, max_position_embeddings=arch.max_positions,
        tie_word_embeddings=True, initializer_range=0.02, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, architectures=["LlamaForCausalLM"])


def build_model(arch: ArchConfig, tokenizer) -> nn.Module:
    """A freshly initialised float32 ``LlamaForCausalLM`` (see the module docstring)."""
    from transformers import LlamaForCausalLM

    config = hf_config(arch, tokenizer)
    state = torch.random.get_rng_state()
    torch.manual_seed(arch.seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model.float()


def skeleton(arch: ArchConfig, tokenizer) -> nn.Module:
    """The model's modules without weights (``meta`` device): to check shapes before building."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(hf_config(arch, tokenizer))


def parameter_count(arch: ArchConfig, vocab: int) -> int:
    """Parameters of ``arch`` (tied embeddings counted once), without building it."""
    h, kv = arch.hidden, arch.hidden // arch.heads * arch.kv_width
    block = h * h * 2 + h * kv * 2 + 3 * h * arch.mlp_width + 2 * h
    return vocab * h + arch.layers * block + h


def tokenizer():
    """SmolLM2's tokenizer (the model is converted once and cached if it is not yet)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from slimtune.models import resolve_model_dir

    hf_logging.disable_progress_bar()  # slimtune's own progress says what happens
    return AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
