"""Calibration windows: the one sampler of token windows for every data-driven method.

:func:`sample_windows` cuts a token stream into ``slots = len // seqlen`` non-overlapping slots
(after a random offset in ``[0, len - slots·seqlen]`` drawn first, unless ``random_offset`` is
false) and returns ``n`` of them in a seeded random order; :func:`calibration_windows` does that
on a tokenized text split. The same seed gives the same windows.
"""
from __future__ import annotations

import torch

from slimtune.evaluate import tokenize_text


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0,
                   random_offset: bool = True, source: str = "the token stream") -> torch.Tensor:
    """``n`` distinct non-overlapping windows ``[n, seqlen]`` of the 1-D ``ids`` (seeded)."""
    slots = ids.numel() // seqlen if seqlen >= 1 else 0
    if n < 1 or seqlen < 2 or n > slots:
        raise ValueError(f"need 1 <= n <= {slots} windows of seqlen >= 2 from {source} "
                         f"({ids.numel()} tokens); got n={n}, seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    offset = 0
    if random_offset:
        offset = int(torch.randint(0, ids.numel() - slots * seqlen + 1, (1,), generator=g))
    grid = ids[offset:offset + slots * seqlen].view(slots, seqlen)
    return grid[torch.randperm(slots, generator=g)[:n]].clone()


def calibration_windows(tokenizer, data: str = "ptb", split: str = "train", n: int = 128,
                        seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """``n`` random non-overlapping windows [n, seqlen] of the tokenized split (seeded)."""
    from slimtune.data import load_text

    ids = tokenize_text(tokenizer, load_text(data, split))
    return sample_windows(ids, n, seqlen, seed, source=f"{data}/{split}")
