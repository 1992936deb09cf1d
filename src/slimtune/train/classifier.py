"""A sequence classifier on top of any encoder: mean pooling and one linear head.

    logits = head(mean_t(h_t over the non-padding tokens)),   h = encoder(tokens).last_hidden_state

all-MiniLM-L6-v2 (``minilm-l6``, a ``BertModel``) was trained as a sentence encoder with exactly
this mean pooling (its ``1_Pooling`` config), so its pooled output is the natural feature; its
``pooler`` layer (the [CLS] dense + tanh of BERT pre-training) is not used.

The head is exposed as the model's output embeddings (``get_output_embeddings``), so target specs
skip it like an LM head (``all-linear`` does not wrap it) and it trains in full.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput


class SequenceClassifier(nn.Module):
    """``encoder`` (returns ``.last_hidden_state`` [B, T, hidden]) + mean pooling + linear head.

    The head is initialised like a BERT classifier (normal, std 0.02; zero bias) from its own
    generator seeded with ``seed``, so it does not depend on torch's global RNG.
    """

    def __init__(self, encoder: nn.Module, n_classes: int, seed: int = 0):
        super().__init__()
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if hidden is None:
            raise ValueError(f"{type(encoder).__name__} has no config.hidden_size: cannot size "
                             "a classification head")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        ref = next(encoder.parameters())
        self.encoder = encoder
        self.config = encoder.config  # recorded as the base model by slimtune.adapt.save
        self.head = nn.Linear(hidden, n_classes, dtype=ref.dtype, device=ref.device)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(n_classes, hidden, generator=g) * 0.02)
            self.head.bias.zero_()

    def get_output_embeddings(self) -> nn.Linear:
        return self.head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_ignored) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return SequenceClassifierOutput(logits=self.head(pooled))
