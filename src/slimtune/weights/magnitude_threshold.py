"""The exact k-th largest magnitude of a vector seen only in pieces (tensor by tensor).

TIES-Merging's trim as its paper states it keeps the top-k magnitudes of the *whole* flattened
task vector, which for a model does not fit in memory next to the models. The magnitude of a
float32 ``x`` as an int32 bit pattern (``|x|.view(int32)``) is monotone in ``|x|``, so the k-th
largest value is found exactly in two passes over the pieces: pass 1 counts the pieces' entries
per high 16-bit prefix and picks the prefix holding the k-th largest; pass 2 counts the low 16
bits of the entries with that prefix and picks the exact value. Memory: two count vectors of
32768 and 65536 int64, whatever the vector's size.

    finder = KthMagnitude(total=n, k=k)
    for piece in pieces: finder.count(piece)          # pass 1
    finder.next_pass()
    for piece in pieces: finder.count(piece)          # pass 2
    threshold = finder.value()                        # keep |x| >= threshold

Entries equal to the threshold are all kept (as ``torch.kthvalue``-based trims do), so ties at
the threshold can keep a few more than ``k``. NaN magnitudes are not supported.
"""
from __future__ import annotations

import torch

HIGH_BINS, LOW_BINS = 1 << 15, 1 << 16


def magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """``|t|`` in float32 as int32 bit patterns (monotone in the magnitude), flattened."""
    return t.detach().float().abs().reshape(-1).view(torch.int32)


def _pick(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """``(bin, rank within it)``: the bin holding the k-th largest entry (bins ascending)."""
    from_top = counts.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    above = int(from_top[index - 1]) if index > 0 else 0
    return counts.numel() - 1 - index, k - above


class KthMagnitude:
    """Two-pass exact k-th largest magnitude (see the module docstring)."""

    def __init__(self, total: int, k: int):
        if not 0 <= k <= total:
            raise ValueError(f"need 0 <= k <= total, got k={k}, total={total}")
        self.total, self.k, self.pass_index = total, k, 0
        self.counts = torch.zeros(HIGH_BINS, dtype=torch.int64)
        self.high = self.rank = None

    def count(self, piece: torch.Tensor) -> None:
        if self.pass_index == 1 and self.k == 0:
            return
        bits = magnitude_bits(piece)
        if self.pass_index == 0:
            self.counts += torch.bincount(bits >> 16, minlength=HIGH_BINS).cpu()
        else:
            low = bits[(bits >> 16) == self.high] & 0xFFFF
            self.counts += torch.bincount(low, minlength=LOW_BINS).cpu()

    def next_pass(self) -> None:
        if self.pass_index != 0:
            raise RuntimeError("KthMagnitude has only two passes")
        seen = int(self.counts.sum())
        if seen != self.total:
            raise ValueError(f"pass 1 counted {seen} entries, expected {self.total}")
        self.pass_index = 1
        if self.k > 0:
            self.high, self.rank = _pick(self.counts, self.k)
            self.above = self.k - self.rank  # entries in higher bins than the k-th's
        self.counts = torch.zeros(LOW_BINS, dtype=torch.int64)

    def value(self) -> float:
        """The k-th largest magnitude (``inf`` for k = 0: nothing is kept)."""
        if self.pass_index != 1:
            raise RuntimeError("value() needs both passes")
        if self.k == 0:
            return float("inf")
        low, _ = _pick(self.counts, self.rank)
        bits = torch.tensor([(self.high << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32))


    def kept(self) -> int:
        """How many entries have ``|x| >= value()``: ``k``, or more when entries equal to the
        k-th largest are not all needed (a tie across the threshold)."""
        if self.k == 0:
            return 0
        low, _ = _pick(self.counts, self.rank)
        return self.above + int(self.counts[low:].sum())


def kth_magnitude(pieces: list[torch.Tensor], k: int) -> float:
    """The k-th largest ``|x|`` over all entries of ``pieces`` (in memory; for tests and one
    tensor)."""
    finder = KthMagnitude(sum(p.numel() for p in pieces), k)
    for _ in range(2):
        for piece in pieces:
            finder.count(piece)
        if finder.pass_index == 0:
            finder.next_pass()
    return finder.value()
