"""Matrix Nuclear-Norm of a causal LM's predictions, next to its perplexity on the same windows.

Li et al. 2024, "Large Language Model Evaluation via Matrix Nuclear-Norm": the nuclear norm of
the output-probability matrix measures how confidently and how diversely a model predicts (a
convex surrogate of the matrix's rank); the L1,2-norm approximation (sum of the top ``D`` column
L2 norms, ``D = min(rows, columns)``, divided by the number of rows) needs no SVD, which the paper
reports 8 to 24 times faster than Matrix Entropy for Cerebras-GPT 111M to 6.7B. The formula is
:func:`slimtune.weights.nuclear_norm.matrix_nuclear_norm`.

Here it is computed inside :func:`slimtune.evaluate.perplexity`'s scoring loop (its
``logits_hook``), so the windows are exactly the perplexity protocol's: the first ``max_tokens``
tokens in non-overlapping windows of ``seqlen``. Per window, the probability matrix is the
softmax of the ``seqlen - 1`` scored positions (``[seqlen - 1, vocabulary]``: the predictions
perplexity scores); the reported value is the mean over windows (the authors average their
per-response, length-normalised values the same way). Higher means more confident and more
diverse predictions; it is only comparable between models with the same vocabulary and
``seqlen``.
"""
from __future__ import annotations

import torch
from torch import nn

from slimtune.evaluate import perplexity
from slimtune.weights.nuclear_norm import matrix_nuclear_norm


def nuclear_norm_and_perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int = 512,
                                max_tokens: int | None = None, batch_size: int = 1,
                                top_d: int | None = None, progress: bool = True) -> dict:
    """:func:`slimtune.evaluate.perplexity`'s result plus ``"nuclear_norm"`` (mean Matrix
    Nuclear-Norm over the windows), ``"nuclear_norm_min"``/``"nuclear_norm_max"`` and
    ``"nuclear_norm_top_d"`` (``D``; ``None`` = ``min(rows, vocabulary)``), from one pass."""
    values: list[float] = []

    def per_window(logits: torch.Tensor) -> None:
        for window in logits:  # [seqlen, vocab]; the last position has no target
            probs = torch.softmax(window[:-1].to(torch.float32), dim=-1)
            values.append(matrix_nuclear_norm(probs, top_d))

    result = perplexity(model, token_ids, seqlen=seqlen, max_tokens=max_tokens,
                        batch_size=batch_size, progress=progress, logits_hook=per_window)
    result.update(nuclear_norm=sum(values) / len(values), nuclear_norm_min=min(values),
                  nuclear_norm_max=max(values), nuclear_norm_top_d=top_d)
    return result
