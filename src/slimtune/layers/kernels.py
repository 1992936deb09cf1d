"""PyTorch's own CPU weight-only kernels for a :class:`~slimtune.layers.bases.PackedQuantBase`.

``PackedQuantBase.forward`` calls :func:`quant_matmul`; when it returns None the base dequantises
its whole weight and runs ``F.linear`` as before. Our grid (:mod:`slimtune.weights.quant`):
signed ``q`` in ``[-2^(b-1), 2^(b-1) - 1]``, ``w = scale · (q - zero)`` per (row, group).

* 8-bit, per output channel (``group_size`` None or ``in_features``), symmetric::

      y = aten._weight_int8pack_mm(x2d, q.int8 [out, in], scale[:, 0] [out])
        = x2d @ (q · s)ᵀ                       (scales in x's dtype)

* 4-bit, symmetric or asymmetric, a group size with a divisor ``gk`` in 256/128/64/32 (per
  channel counts as one group of ``in_features``). The kernel reads unsigned ``u`` in 0..15 and
  ``scales_and_zeros [in / gk, out, 2]`` (``[..., 0]`` a scale ``s'``, ``[..., 1]`` a float
  offset ``z'``) and applies ``w = (u - 8) · s' + z'`` (read in ``int4mm_kernel.cpp``, checked
  here). With ``u = q + 8``, ``s' = scale`` and ``z' = -scale · zero`` that is exactly
  ``scale · (q - zero)``; each of our groups is repeated ``g / gk`` times along the input::

      packed = aten._convert_weight_to_int4pack_for_cpu((q + 8).int32 [out, in], 2)
      y = aten._weight_int4pack_mm_for_cpu(x2d, packed, gk, scales_and_zeros)

  ``inner_k_tiles`` (2) is ignored on CPU (1, 2, 4 and 8 give the same bytes). Needs ``out`` a
  multiple of 16; any other group size (e.g. 16) falls back.

When a kernel is used (measured with torch 2.13.0+cpu on an AVX-512 x86 CPU, one thread): only
for CPU tensors (``x`` and the base) of float32, bfloat16 or float16, and only without autograd
on ``x`` (neither op has a derivative), so adapter training over a packed base dequantises. Both
ops take a 2-D contiguous ``x`` and scales in ``x``'s dtype only. Only bfloat16 has vectorised
x86 code: it always uses the kernel (576×576 int4: 23 µs for 1 token, 4.2 ms for 512, against 6
and 8 ms dequantising). float32 and float16 run a scalar loop whose time grows with the rows
(float32 576×576 int4: 0.6 ms per token; int8 0.3 ms) while dequantising costs about the same
at any length (4-15 ms per call when measured, mostly the bit unpacking; since the byte-wise
unpack of :mod:`slimtune.weights.packing` a 576×1536 4-bit weight dequantises in ~3 ms), so for
them a kernel runs only up to
:data:`SCALAR_MAX_TOKENS` rows (token-by-token decoding, where it is 7-15× faster than
dequantising, yet still 6-16× slower than a dense float32 ``F.linear``); longer inputs dequantise.

Agreement with the dequantising path, as max |Δ| / max |y| on real SmolLM2-135M weights (RTN,
q/k/o/up/down projections of blocks 0, 10, 29, real hidden states): float32 at most 1.7e-6 (the
kernels accumulate in float32), so float32 uses them; bfloat16 at most 9.2e-3, where both paths
round to bfloat16 differently (the kernel its scales, offsets and output, the other each weight)
and each is 2-6e-3 from the float32 result. tests/test_kernels.py holds them to 1e-5 and 2e-2.

The prepared operands are made on first use and kept on the base as the plain attribute
``_kernel_cache`` (never in the state dict; dropped by pickling and ``deepcopy``). They are
remade when the kernel or dtype changes or when any of ``packed``, ``scale``, ``zero`` is another
tensor (weak reference identity), has other storage (``data_ptr``) or was written in place
(``_version``; ``load_state_dict`` copies in place). Tensors made under ``torch.inference_mode``
keep no version counter: in-place writes to those are not seen. ``SLIMTUNE_QUANT_KERNELS=0``
forces the dequantising path (read on every call).
"""
from __future__ import annotations

import os
import weakref
from abc import ABC, abstractmethod

import torch
from torch import Tensor

ENV_SWITCH = "SLIMTUNE_QUANT_KERNELS"
DEQUANTIZE = "dequantize"
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts
INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu needs out % 16 == 0
VECTORISED = (torch.bfloat16,)  # dtypes with vectorised x86 kernels
SCALAR = (torch.float32, torch.float16)  # accepted, scalar loop: few tokens only
SCALAR_MAX_TOKENS = 4


def kernels_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


class Kernel(ABC):
    """One weight-only kernel: ``prepare`` makes its operands from a base once, ``run`` applies
    them to a 2-D contiguous input of the prepared dtype."""

    name = "kernel"

    @abstractmethod
    def prepare(self, base, dtype: torch.dtype) -> tuple[Tensor, ...]: ...

    @abstractmethod
    def run(self, x2d: Tensor, operands: tuple[Tensor, ...]) -> Tensor: ...

    def accepts(self, base, x: Tensor) -> bool:
        """Whether this input goes through the kernel (device, dtype, autograd, tokens)."""
        if x.device.type != "cpu" or base.packed.device.type != "cpu":
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        if x.dtype in VECTORISED:
            return True
        tokens = x.numel() // max(x.shape[-1], 1) if x.ndim else 0
        return x.dtype in SCALAR and tokens <= SCALAR_MAX_TOKENS

    def matmul(self, base, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        y = self.run(x2d, prepared(base, self, x.dtype))
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Int8Kernel(Kernel):
    """``aten._weight_int8pack_mm``: int8 weight, one scale per output row."""

    name = "int8"

    def prepare(self, base, dtype):
        q = base.integers().to(torch.int8).contiguous()
        return q, base.scale[:, 0].to(dtype).contiguous()

    def run(self, x2d, operands):
        return torch.ops.aten._weight_int8pack_mm(x2d, *operands)


class Int4Kernel(Kernel):
    """``aten._weight_int4pack_mm_for_cpu`` with kernel groups of ``group`` inputs."""

    name = "int4"

    def __init__(self, group: int, repeat: int):
        self.group, self.repeat = group, repeat  # kernel group width, kernel groups per ours

    def prepare(self, base, dtype):
        u = (base.integers() + 8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 2)
        work = torch.promote_types(base.scale.dtype, torch.float32)
        scale = base.scale.to(work)
        offset = -(scale * base.zero.to(work))
        pairs = torch.stack([scale, offset], dim=-1).repeat_interleave(self.repeat, dim=1)
        return packed, pairs.transpose(0, 1).to(dtype).contiguous()  # [in / gk, out, 2]

    def run(self, x2d, operands):
        packed, pairs = operands
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, packed, self.group, pairs)


def kernel_for(base) -> Kernel | None:
    """The kernel that can compute this base's product (whatever the input), or None."""
    spec, n_in = base.spec, base.in_features
    g = n_in if spec.group_size is None else spec.group_size
    if spec.bits == 8 and spec.sym and g == n_in:
        return Int8Kernel()
    if spec.bits == 4 and base.packed.shape[0] % INT4_ROWS == 0:
        for gk in INT4_GROUPS:
            if g % gk == 0:
                return Int4Kernel(gk, g // gk)
    return None


def _chosen(base, x: Tensor) -> Kernel | None:
    if not kernels_enabled():
        return None
    kernel = kernel_for(base)
    return kernel if kernel is not None and kernel.accepts(base, x) else None


def forward_path(base, x: Tensor) -> str:
    """The path ``base(x)`` takes now: ``"int8"``, ``"int4"`` or :data:`DEQUANTIZE`."""
    kernel = _chosen(base, x)
    return DEQUANTIZE if kernel is None else kernel.name


def quant_matmul(base, x: Tensor) -> Tensor | None:
    """``x @ W_hatᵀ`` through a kernel, or None when the base should dequantise."""
    kernel = _chosen(base, x)
    if kernel is None:
        if getattr(base, "_kernel_cache", None) is not None and base.packed.device.type != "cpu":
            base._kernel_cache = None  # moved off the CPU: free the CPU operands
        return None
    return kernel.matmul(base, x)


def _signature(t: Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        version = None
    return t.data_ptr(), version


class Prepared:
    """A kernel's operands with the identity, storage and version of the buffers they came from."""

    def __init__(self, tag: tuple, sources: tuple[Tensor, ...], operands: tuple[Tensor, ...]):
        self.tag, self.operands = tag, operands
        self.refs = tuple(weakref.ref(t) for t in sources)
        self.signatures = tuple(_signature(t) for t in sources)

    def fits(self, tag: tuple, sources: tuple[Tensor, ...]) -> bool:
        return (self.tag == tag and len(self.refs) == len(sources)
                and all(r() is t for r, t in zip(self.refs, sources))
                and self.signatures == tuple(_signature(t) for t in sources))

    def __getstate__(self):  # weak references do not pickle; a copy remakes its operands
        return {"tag": None, "operands": (), "refs": (), "signatures": ()}


def prepared(base, kernel: Kernel, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The operands of ``kernel`` for ``base`` in ``dtype``, made once and cached on the base."""
    sources = (base.packed, base.scale, base.zero)
    tag = (kernel.name, getattr(kernel, "group", None), dtype, base.packed.device)
    cache = getattr(base, "_kernel_cache", None)
    if cache is None or not cache.fits(tag, sources):
        with torch.no_grad():
            cache = Prepared(tag, sources, kernel.prepare(base, dtype))
        base._kernel_cache = cache
    return cache.operands
