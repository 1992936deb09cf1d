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
the threshold can keep a few more than ``k``. NaN magnitudes are not supported. ``signed=True``
finds the k-th largest *value* instead (the bits mapped to an order-preserving unsigned key).

:class:`TopMagnitudeMask` turns the threshold into the mask of exactly ``k`` entries, a tie at the
threshold broken by the lowest flat index (the order of a stable descending sort), the pieces fed
in order; the same mask whether the vector comes whole or in pieces.
"""
from __future__ import annotations

import torch

LOW_BINS = 1 << 16
SIGN = 1 << 31


def magnitude_bits(t: torch.Tensor) -> torch.Tensor:
    """``|t|`` in float32 as int32 bit patterns (monotone in the magnitude), flattened."""
    return t.detach().float().abs().reshape(-1).view(torch.int32)


def value_keys(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 as int64 keys in ``[0, 2³²)``, monotone in the value (−0 below +0)."""
    bits = t.detach().float().reshape(-1).view(torch.int32).long()
    return torch.where(bits >= 0, bits + SIGN, SIGN - 1 - (bits & (SIGN - 1)))


def key_value(key: int) -> float:
    bits = key - SIGN if key >= SIGN else (SIGN - 1 - key) | SIGN
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32))


def _pick(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """``(bin, rank within it)``: the bin holding the k-th largest entry (bins ascending)."""
    from_top = counts.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor(k, dtype=from_top.dtype)))
    above = int(from_top[index - 1]) if index > 0 else 0
    return counts.numel() - 1 - index, k - above


class KthMagnitude:
    """Two-pass exact k-th largest magnitude (see the module docstring)."""

    def __init__(self, total: int, k: int, signed: bool = False):
        if not 0 <= k <= total:
            raise ValueError(f"need 0 <= k <= total, got k={k}, total={total}")
        self.total, self.k, self.pass_index, self.signed = total, k, 0, signed
        self.high_bins = 1 << 16 if signed else 1 << 15
        self.counts = torch.zeros(self.high_bins, dtype=torch.int64)
        self.high = self.rank = None

    def count(self, piece: torch.Tensor) -> None:
        if self.pass_index == 1 and self.k == 0:
            return
        bits = value_keys(piece) if self.signed else magnitude_bits(piece)
        if self.pass_index == 0:
            self.counts += torch.bincount(bits >> 16, minlength=self.high_bins).cpu()
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
        if self.signed:
            return key_value((self.high << 16) | low)
        bits = torch.tensor([(self.high << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32))

    def kept(self) -> int:
        """How many entries have ``|x| >= value()``: ``k``, or more when entries equal to the
        k-th largest are not all needed (a tie across the threshold)."""
        if self.k == 0:
            return 0
        low, _ = _pick(self.counts, self.rank)
        return self.above + int(self.counts[low:].sum())

    def above_value(self) -> int:
        """How many entries have ``|x| > value()``."""
        if self.k == 0:
            return 0
        low, _ = _pick(self.counts, self.rank)
        return self.above + int(self.counts[low + 1:].sum())


class TopMagnitudeMask:
    """The mask of the ``k`` largest ``|x|`` of a vector of ``total`` entries seen in pieces:
    two counting passes (``count`` each piece, ``next_pass``, ``count`` each again), then
    ``mask(piece)`` for each piece in order. Of the entries tied at the k-th magnitude, the first
    ones by position are kept."""

    def __init__(self, total: int, k: int):
        self.finder = KthMagnitude(total, k)
        self.passes = 0

    def count(self, piece: torch.Tensor) -> None:
        self.finder.count(piece)

    def next_pass(self) -> None:
        self.passes += 1
        if self.passes == 1:
            self.finder.next_pass()
        elif self.passes == 2:
            self.threshold = self.finder.value()
            self.ties_needed = self.finder.k - self.finder.above_value()
            self.straddles = self.finder.kept() > self.finder.k
        else:
            raise RuntimeError("TopMagnitudeMask has two counting passes")

    def mask(self, piece: torch.Tensor) -> torch.Tensor:
        """Bool, shaped like ``piece``: which of its entries are among the top ``k``."""
        if self.passes != 2:
            raise RuntimeError("mask() needs both counting passes")
        size = piece.detach().float().abs()
        keep = size > self.threshold
        if not self.straddles:
            return keep | (size == self.threshold)
        tied = size == self.threshold
        if self.ties_needed > 0:
            rank = tied.reshape(-1).cumsum(0).reshape(tied.shape)
            keep |= tied & (rank <= self.ties_needed)
        self.ties_needed -= int(tied.sum())
        return keep


def top_magnitude_mask(t: torch.Tensor, k: int) -> torch.Tensor:
    """Bool like ``t``: its ``k`` largest ``|x|``, a tie broken by the lowest flat index."""
    finder = TopMagnitudeMask(t.numel(), k)
    for _ in range(2):
        finder.count(t)
        finder.next_pass()
    return finder.mask(t)


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
