"""Measure a model: perplexity of a causal LM, accuracy of a classifier, and its costs.

Perplexity protocol (:func:`perplexity`), the one every slimtune number uses:

1. The whole split is tokenized ONCE as a single string (:func:`tokenize_text`), with no special
   tokens added (no BOS/EOS), so the windows are the same for every method compared.
2. The first ``max_tokens`` tokens (all if ``None``) are cut into non-overlapping windows of
   ``seqlen`` tokens. The incomplete tail (fewer than ``seqlen`` tokens) is DROPPED, so every window
   has the same length; fewer than ``seqlen`` tokens is an error (zero windows).
3. Each window is scored on its own (no context carried over from the previous window): every
   next-token prediction inside it counts, i.e. ``seqlen - 1`` predictions per window.
4. NLL = (sum of per-token negative log-likelihoods, accumulated in float64) / (number of scored
   tokens); perplexity = exp(NLL). Because all windows score the same number of tokens this equals
   exp of the plain average of Hugging Face's per-window ``model(ids, labels=ids).loss``.

Costs: ``tokens_per_s`` counts input tokens (``windows * seqlen``) over the wall time of the scoring
loop (forward passes plus the loss); ``peak_rss_mb`` is the process's peak resident set size so far
(it includes model loading and never goes down).
"""
from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.progress import progress_bar


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` tokenized in one call, as a 1-D LongTensor.

    No special tokens are added (``add_special_tokens=False``): the split is one long stream that
    :func:`perplexity` cuts into windows. The tokenizer's "sequence longer than the maximum length"
    warning is suppressed (``verbose=False``) since nothing is fed to the model in one piece.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int = 512,
               max_tokens: int | None = None, batch_size: int = 1, progress: bool = True,
               logits_hook: Callable[[torch.Tensor], None] | None = None) -> dict:
    """Perplexity of a causal LM on ``token_ids`` by the protocol in the module docstring.

    ``model(input_ids=..., use_cache=False)`` must return an object with ``.logits`` ``[B, T, vocab]``. Windows are
    run ``batch_size`` at a time (the last batch may be smaller). The model is put in eval mode for
    the call and its previous mode restored. Returns ``{"perplexity", "nll", "tokens"`` (scored
    tokens), ``"windows", "seqlen", "seconds"`` (scoring loop wall time), ``"tokens_per_s"``
    (input tokens / seconds), ``"peak_rss_mb"}``. Raises ``ValueError`` on bad arguments or fewer
    than ``seqlen`` tokens. ``logits_hook(logits)``, if given, sees every batch's logits
    ``[B, seqlen, vocab]`` (under ``torch.inference_mode``): other measures on the same windows,
    e.g. :func:`slimtune.analyze.nuclear_norm.nuclear_norm_and_perplexity`.
    """
    if token_ids.ndim != 1 or token_ids.dtype != torch.long:
        raise ValueError(f"token_ids must be a 1-D LongTensor, got {token_ids.dtype} "
                         f"of shape {tuple(token_ids.shape)}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 (one window scores seqlen-1 tokens), got {seqlen}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    ids = token_ids if max_tokens is None else token_ids[:max_tokens]
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"need at least seqlen={seqlen} tokens for one window, got {ids.numel()}"
                         + ("" if max_tokens is None else f" (max_tokens={max_tokens})"))

    windows = ids[: n_windows * seqlen].view(n_windows, seqlen).to(model_device(model))
    # Targets are the windows shifted left by one; the last position of each window has no target.
    targets = torch.roll(windows, shifts=-1, dims=1)
    targets[:, -1] = -100  # cross_entropy's ignore_index: lets the logits stay a contiguous view

    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=windows.device)
    bar, task = progress_bar(n_windows, f"perplexity ({n_windows}×{seqlen})", progress)
    start = time.perf_counter()
    try:
        with bar, torch.inference_mode():
            for first in range(0, n_windows, batch_size):
                batch = windows[first:first + batch_size]
                logits = model(input_ids=batch, use_cache=False).logits
                if logits_hook is not None:
                    logits_hook(logits)
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]),
                                       targets[first:first + batch_size].reshape(-1),
                                       ignore_index=-100, reduction="sum")
                nll_sum += loss.to(torch.float64)  # per-batch float32 sum, running total in float64
                del logits, loss
                bar.advance(task, batch.shape[0])
            total = nll_sum.item()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start

    scored = n_windows * (seqlen - 1)
    nll = total / scored
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": scored,
        "windows": n_windows,
        "seqlen": seqlen,
        "seconds": seconds,
        "tokens_per_s": n_windows * seqlen / seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def accuracy(model: nn.Module, tokenizer, texts: Sequence[str], labels: Sequence[int],
             batch_size: int = 32, max_length: int = 512) -> dict:
    """Accuracy of a sequence classifier: ``argmax(model(**batch).logits)`` against integer labels.

    Any model whose output has ``.logits`` of shape ``[B, classes]`` works. Texts are tokenized in
    batches with padding and truncation to ``max_length``. Returns ``{"accuracy", "n"}``.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise ValueError("no texts to classify")
    label_ids = torch.as_tensor(list(labels), dtype=torch.long)
    device = model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.inference_mode():
            for first in range(0, len(texts), batch_size):
                batch = tokenizer(list(texts[first:first + batch_size]), padding=True,
                                  truncation=True, max_length=max_length, return_tensors="pt")
                logits = model(**batch.to(device)).logits
                if logits.ndim != 2:
                    raise ValueError(f"expected logits [B, classes], got {tuple(logits.shape)}")
                predicted = logits.argmax(dim=-1).cpu()
                correct += int((predicted == label_ids[first:first + batch_size]).sum())
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(texts), "n": len(texts)}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``ru_maxrss``: KB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def parameter_count(model: nn.Module) -> int:
    """Number of parameters, counting shared (tied) tensors once."""
    return sum(p.numel() for p in model.parameters())  # parameters() skips duplicates


def bytes_on_disk(path: str | os.PathLike) -> int:
    """Total size in bytes of a file, or of all files under a directory (recursively)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
