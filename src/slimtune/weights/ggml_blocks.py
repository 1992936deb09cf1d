"""GGML's 32-wide weight blocks (llama.cpp's ``Q4_0``, ``Q4_1`` and ``Q8_0``), built from integers
that are already quantised, so a calibrated quantiser's integers reach llama.cpp unchanged.

Each row of a weight ``[out, in]`` (``in`` a multiple of 32) is cut into blocks of 32 columns, each
stored with an fp16 scale ``d`` (little-endian bytes, no padding between blocks)::

    Q4_0: d, 16 bytes          byte j = nibble j | nibble (j + 16) << 4,   w = d · (nibble − 8)
    Q4_1: d, m, 16 bytes       (same nibble order),                        w = d · nibble + m
    Q8_0: d, 32 int8 values q                                              w = d · q

A slimtune grid (:mod:`slimtune.weights.quant`) is ``w = (q − zero) · scale`` per (row, group), with
signed ``q`` in ``[−2^(b−1), 2^(b−1) − 1]``. When every group spans whole blocks (group size a
multiple of 32, or one group per row), each block takes its group's scale and:

- symmetric, b ≤ 4 → Q4_0 with nibble = q + 8 (exact integers; the scale rounded to fp16);
- any zero point, b ≤ 4 → Q4_1 with nibble = q + 8, d = scale, m = −(8 + zero) · scale (m is
  rounded to fp16 too: :func:`q4_1_offset_error` measures what that costs);
- b ≤ 7 (symmetric or not) → Q8_0 with q8 = q − zero, which lies in [−127, 127] (8-bit symmetric
  too: q in [−128, 127]; 8-bit asymmetric does not fit).

:func:`carrier_error` names why a grid does not fit a type (None when it does). Decoding is
gguf's own ``gguf.quants.dequantize`` (the tests check our blocks against it).
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.weights.quant import QuantSpec

BLOCK = 32
BLOCK_BYTES = {"q4_0": 2 + 16, "q4_1": 4 + 16, "q8_0": 2 + 32}


def carrier_error(spec: QuantSpec, in_features: int, gguf_type: str) -> str | None:
    """Why integers on ``spec`` cannot be carried exactly by ``gguf_type``, or None."""
    if gguf_type not in BLOCK_BYTES:
        raise ValueError(f"unknown block type {gguf_type!r}; known: {sorted(BLOCK_BYTES)}")
    if in_features % BLOCK:
        return f"{in_features} inputs are not a multiple of the {BLOCK}-wide blocks"
    g = spec.group_width(in_features)
    if g % BLOCK:
        return f"group size {g} is not a multiple of the {BLOCK}-wide blocks"
    if gguf_type == "q4_0":
        if not spec.sym:
            return "q4_0 has no zero point (asymmetric grid): use q4_1 or q8_0"
        if spec.bits > 4:
            return f"{spec.bits}-bit integers do not fit q4_0's 4 bits: use q8_0"
    elif gguf_type == "q4_1":
        if spec.bits > 4:
            return f"{spec.bits}-bit integers do not fit q4_1's 4 bits: use q8_0"
    elif spec.bits == 8 and not spec.sym:
        return "8-bit asymmetric integers minus their zero point span 255 values, q8_0 holds 255 " \
               "only symmetric around 0"
    return None


def exact_carrier(spec: QuantSpec, in_features: int) -> str | None:
    """The smallest of q4_0 / q4_1 / q8_0 that carries ``spec``'s integers exactly, or None."""
    for t in ("q4_0", "q4_1", "q8_0"):
        if carrier_error(spec, in_features, t) is None:
            return t
    return None


def _block_values(x: Tensor, in_features: int) -> Tensor:
    """``[out, groups]`` per-group values -> ``[out, in / 32]`` per-block values."""
    groups = x.shape[1]
    return x.repeat_interleave(in_features // BLOCK // groups, dim=1)


def _fp16_bytes(x: Tensor) -> Tensor:
    """``[out, nb]`` floats -> ``[out, nb, 2]`` uint8, fp16 little-endian."""
    h = x.to(torch.float16).contiguous().view(torch.int16).to(torch.int32)
    return torch.stack([h & 0xFF, (h >> 8) & 0xFF], dim=-1).to(torch.uint8)


def _nibble_bytes(nibbles: Tensor) -> Tensor:
    """``[out, nb, 32]`` values in [0, 16) -> ``[out, nb, 16]`` bytes (j low, j + 16 high)."""
    return (nibbles[..., :16] | (nibbles[..., 16:] << 4)).to(torch.uint8)


def _check(q: Tensor, scale: Tensor) -> tuple[int, int]:
    if q.ndim != 2 or q.shape[1] % BLOCK:
        raise ValueError(f"expected integers [out, in] with in a multiple of {BLOCK}, got "
                         f"{tuple(q.shape)}")
    nb = q.shape[1] // BLOCK
    if scale.ndim != 2 or scale.shape[0] != q.shape[0] or nb % scale.shape[1]:
        raise ValueError(f"scales {tuple(scale.shape)} do not group the {nb} blocks of each row")
    return q.shape[0], nb


def q4_0_blocks(q: Tensor, scale: Tensor) -> Tensor:
    """Symmetric integers ``q [out, in]`` in [−8, 7] with per-group ``scale [out, groups]`` ->
    Q4_0 bytes ``uint8 [out, in / 32 · 18]``."""
    out, nb = _check(q, scale)
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"q4_0 holds integers in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    d = _fp16_bytes(_block_values(scale, q.shape[1]))
    nib = _nibble_bytes((q.to(torch.int32) + 8).view(out, nb, BLOCK))
    return torch.cat([d, nib], dim=-1).reshape(out, nb * BLOCK_BYTES["q4_0"])


def q4_1_blocks(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Integers ``q [out, in]`` in [−8, 7] on ``(scale, zero) [out, groups]`` -> Q4_1 bytes
    ``uint8 [out, in / 32 · 20]`` (d = scale, m = −(8 + zero)·scale, both fp16)."""
    out, nb = _check(q, scale)
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"q4_1 holds integers in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    s = _block_values(scale, q.shape[1])
    m = -(8 + _block_values(zero, q.shape[1]).to(s.dtype)) * s
    nib = _nibble_bytes((q.to(torch.int32) + 8).view(out, nb, BLOCK))
    return torch.cat([_fp16_bytes(s), _fp16_bytes(m), nib], dim=-1).reshape(
        out, nb * BLOCK_BYTES["q4_1"])


def q8_0_blocks(q: Tensor, scale: Tensor, zero: Tensor | None = None) -> Tensor:
    """Integers ``q [out, in]`` on ``(scale, zero) [out, groups]`` with ``q − zero`` in
    [−128, 127] -> Q8_0 bytes ``uint8 [out, in / 32 · 34]``."""
    out, nb = _check(q, scale)
    v = q.to(torch.int32)
    if zero is not None:
        v = v - _block_values(zero.to(torch.int32), q.shape[1]).repeat_interleave(BLOCK, dim=1)
    if v.numel() and (int(v.min()) < -128 or int(v.max()) > 127):
        raise ValueError(f"q8_0 holds integers in [-128, 127], got [{int(v.min())}, "
                         f"{int(v.max())}]")
    d = _fp16_bytes(_block_values(scale, q.shape[1]))
    vals = v.to(torch.int8).view(torch.uint8).view(out, nb, BLOCK)
    return torch.cat([d, vals], dim=-1).reshape(out, nb * BLOCK_BYTES["q8_0"])


def blocks(gguf_type: str, q: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """The ``gguf_type`` bytes of integers ``q`` on a grid of ``spec`` (see :func:`carrier_error`)."""
    why = carrier_error(spec, q.shape[1], gguf_type)
    if why is not None:
        raise ValueError(why)
    if gguf_type == "q4_0":
        return q4_0_blocks(q, scale)
    if gguf_type == "q4_1":
        return q4_1_blocks(q, scale, zero)
    return q8_0_blocks(q, scale, None if spec.sym else zero)


def carried_weight(gguf_type: str, q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """The float32 weight that ``gguf_type`` blocks of these integers decode to (fp16-rounded
    scales and offsets), computed here without building the bytes."""
    n = q.shape[1]
    s = _block_values(scale, n).to(torch.float16).float().repeat_interleave(BLOCK, dim=1)
    z = _block_values(zero.to(torch.float32), n).repeat_interleave(BLOCK, dim=1)
    qf = q.to(torch.float32)
    if gguf_type == "q4_1":
        m = (-(8 + _block_values(zero.to(scale.dtype), n)) * _block_values(scale, n))
        m = m.to(torch.float16).float().repeat_interleave(BLOCK, dim=1)
        return s * (qf + 8) + m
    return s * (qf - z)


def q4_1_offset_error(q: Tensor, scale: Tensor, zero: Tensor) -> float:
    """Largest ``|w_q4_1 − w_exact| / max|w_exact|`` over the weight: what Q4_1's fp16 offset and
    scale cost against the grid's exact values."""
    exact = (q.to(torch.float32) - _block_values(zero.to(torch.float32), q.shape[1])
             .repeat_interleave(BLOCK, dim=1)) * _block_values(scale.float(), q.shape[1]) \
        .repeat_interleave(BLOCK, dim=1)
    diff = (carried_weight("q4_1", q, scale, zero) - exact).abs().max()
    return float(diff / exact.abs().max().clamp_min(1e-30))
