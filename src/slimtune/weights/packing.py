"""Dense bit packing of quantised integers (and boolean masks) into ``uint8`` bytes.

Byte layout (what :func:`pack` writes and :func:`unpack` reads), for a ``[rows, n]`` tensor of
unsigned ``bits``-bit values (``bits`` in 1..8, values in ``[0, 2^bits)``):

* Every row is packed on its own into ``ceil(n * bits / 8)`` bytes; the result is a ``uint8``
  tensor ``[rows, ceil(n * bits / 8)]`` (row-major, so row ``r`` starts at byte
  ``r * ceil(n * bits / 8)`` of the flat buffer). Rows never share a byte.
* A row is a little-endian bit stream: bit ``i`` of the stream is bit ``i % 8`` (``2^(i % 8)``)
  of byte ``i // 8``, least significant bit first.
* Value ``k`` of the row occupies stream bits ``k*bits .. k*bits + bits - 1``, its own least
  significant bit first: bit ``j`` of value ``k`` is stream bit ``k*bits + j``.
* The unused high bits of a row's last byte (``8 * nbytes - n * bits`` of them) are 0.

So 8 bits is one value per byte (the identity on ``uint8``); 4 bits is two per byte, the first in
the low nibble (``[1, 2, 3, 4] -> [0x21, 0x43]``); 2 bits is four per byte, the first in the
lowest two bits; 1 bit is eight per byte, the first in bit 0 (the mask layout of
:func:`pack_mask`); 3, 5, 6 and 7 bits straddle byte boundaries (3-bit ``[7, 0, 1]`` is the
stream ``111 000 100`` -> bytes ``[0b01000111, 0b00000000]``).

The values are unsigned: signed quantisation integers ``q`` in ``[q_min, q_max]`` of a
:class:`~slimtune.weights.quant.QuantSpec` are stored as ``q - q_min`` (:func:`to_unsigned`)
and recovered with :func:`to_signed`.

:func:`pack_int32` / :func:`unpack_int32` hold the same row bit streams in little-endian int32
words (``[rows, ceil(n * bits / 32)]``, a value may straddle two words): compressed-tensors'
``pack-quantized`` layout from its release 0.18 on.
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.weights.quant import QuantSpec

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def packed_bytes(rows: int, n: int, bits: int) -> int:
    """Storage size in bytes of ``rows`` rows of ``n`` ``bits``-bit values."""
    _check_bits(bits)
    _check_n(n)
    _check_n(rows)
    return rows * ((n * bits + 7) // 8)


def pack(q: Tensor, bits: int) -> Tensor:
    """Pack unsigned integers ``q [rows, n]`` in ``[0, 2^bits)`` into ``uint8
    [rows, ceil(n * bits / 8)]`` (layout in the module docstring), on ``q``'s device."""
    _check_bits(bits)
    if not isinstance(q, Tensor) or q.dtype not in _INT_DTYPES:
        raise ValueError(f"expected an integer tensor, got {getattr(q, 'dtype', type(q))}")
    if q.ndim != 2:
        raise ValueError(f"expected a 2-D tensor [rows, n], got shape {tuple(q.shape)}")
    rows, n = q.shape
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2 ** bits):
        raise ValueError(f"values must lie in [0, {2 ** bits}) for {bits} bits, got "
                         f"[{int(q.min())}, {int(q.max())}]")
    return _pack_words(q, bits)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """The ``n`` values per row of ``packed`` (``uint8 [rows, ceil(n * bits / 8)]``, as written
    by :func:`pack`), as ``int32 [rows, n]`` on ``packed``'s device."""
    _check_bits(bits)
    _check_n(n)
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
    if packed.ndim != 2:
        raise ValueError(f"expected a 2-D tensor [rows, bytes], got shape {tuple(packed.shape)}")
    rows, width = packed.shape
    nbytes = (n * bits + 7) // 8
    if width != nbytes:
        raise ValueError(f"{n} values of {bits} bits need {nbytes} bytes per row, got {width}")
    return _unpack_words(packed, bits, n)


# Eight values of b bits are exactly b bytes of the stream: pack and unpack work on such
# chunks, each one int64 word (b <= 7: at most 56 bits; 8 bits are the bytes themselves).
def _pack_words(q: Tensor, bits: int) -> Tensor:
    rows, n = q.shape
    nbytes = (n * bits + 7) // 8
    if bits == 8:
        return q.to(torch.uint8)
    chunks = -(-n // 8)
    vals = q.new_zeros(rows, chunks * 8, dtype=torch.int64)
    vals[:, :n] = q
    shifts = torch.arange(0, 8 * bits, bits, device=q.device, dtype=torch.int64)
    words = (vals.view(rows, chunks, 8) << shifts).sum(dim=-1)
    byte_shifts = torch.arange(0, 8 * bits, 8, device=q.device, dtype=torch.int64)
    out = ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(rows, chunks * bits)
    return out[:, :nbytes].to(torch.uint8)


def _unpack_words(packed: Tensor, bits: int, n: int) -> Tensor:
    rows, width = packed.shape
    if bits == 8:
        return packed.to(torch.int32)
    if 8 % bits == 0:  # whole values per byte: shift the bytes themselves
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
        vals = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return vals.reshape(rows, width * (8 // bits))[:, :n].to(torch.int32)
    chunks = -(-n // 8)
    data = packed.new_zeros(rows, chunks * bits, dtype=torch.int64)
    data[:, :width] = packed
    byte_shifts = torch.arange(0, 8 * bits, 8, device=packed.device, dtype=torch.int64)
    words = (data.view(rows, chunks, bits) << byte_shifts).sum(dim=-1)
    shifts = torch.arange(0, 8 * bits, bits, device=packed.device, dtype=torch.int64)
    vals = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(rows, chunks * 8)[:, :n].to(torch.int32)


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a bool ``mask [rows, n]`` into a ``uint8 [rows, ceil(n / 8)]`` bitmask (the 1-bit
    layout: element ``k`` of a row is bit ``k % 8`` of byte ``k // 8``)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"expected a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    return pack(mask.to(torch.uint8), 1)


def unpack_mask(packed: Tensor, n: int) -> Tensor:
    """The bool ``[rows, n]`` mask of a bitmask written by :func:`pack_mask`."""
    return unpack(packed, 1, n).bool()


def to_unsigned(q: Tensor, spec: QuantSpec) -> Tensor:
    """Signed integers in ``[q_min, q_max]`` of ``spec`` -> ``int32`` in ``[0, 2^bits)``."""
    return q.to(torch.int32) - spec.q_min


def to_signed(u: Tensor, spec: QuantSpec) -> Tensor:
    """The inverse of :func:`to_unsigned`: ``int32`` in ``[q_min, q_max]``."""
    return u.to(torch.int32) + spec.q_min


def pack_int32(u: Tensor, bits: int) -> Tensor:
    """Unsigned ``bits``-bit values ``u [rows, n]`` -> int32 ``[rows, ceil(n·bits/32)]``: each row
    the LSB-first bit stream of its values in little-endian 32-bit words."""
    rows, n = u.shape
    words = -(-n * bits // 32)
    data = torch.zeros(rows, 4 * words, dtype=torch.uint8, device=u.device)
    packed = pack(u.to(torch.int32), bits)
    data[:, :packed.shape[1]] = packed
    b = data.view(rows, words, 4).to(torch.int64)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def unpack_int32(words: Tensor, bits: int, n: int) -> Tensor:
    """The inverse of :func:`pack_int32`: int32 words -> int32 ``[rows, n]`` unsigned values."""
    rows = words.shape[0]
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 8, device=words.device, dtype=torch.int64)
    data = ((w.unsqueeze(-1) >> shifts) & 0xFF).reshape(rows, -1)
    need = -(-n * bits // 8)
    return unpack(data[:, :need].to(torch.uint8).contiguous(), bits, n)
