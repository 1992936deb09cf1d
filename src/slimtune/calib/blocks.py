"""Running one model's blocks on buffered hidden states (the mechanics under
:mod:`slimtune.calib.pipeline`).

:func:`find_blocks` finds the model's list of transformer blocks. ``BlockRunner.capture`` swaps block 0 for a catcher that stores the hidden states and call
arguments of every calibration batch, then stops the forward; ``run`` feeds one block the buffered
inputs batch by batch, with forward pre-hooks accumulating input statistics for chosen linears
(layers fed the very same tensor share one statistics object); ``advance`` makes the outputs the
next block's inputs. Only one block's inputs and outputs are alive at a time.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import weakref
from functools import partial

import torch
from torch import nn

from slimtune.layers import FactoredLinear
from slimtune.weights.stats import InputStatistics

STATS_CHUNK = 1024  # tokens per InputStatistics.update (its float64 copies are chunk × in)
STATS_CHUNK_LOW = 4096  # the same with bfloat16 products (float32 copies; faster in larger ones)
STAT_KINDS = frozenset({"gram", "mean_abs"})  # the needs served by InputStatistics: X^T X; sum |x|


def trim_heap() -> bool:
    """Hand glibc's free heap pages back to the OS (``malloc_trim(0)``; Linux only, else False).

    Called after every block: the per-batch activations freed during a block otherwise stay in
    the process's arenas and RSS creeps up block after block."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_MMAP_THRESHOLD = 32 << 20  # glibc's largest: allocations up to 32 MiB come from the heap


def keep_heap() -> bool:
    """Make glibc keep freed memory for reuse (process-wide; Linux only, else False).

    ``mallopt``: allocations up to 32 MiB come from the heap instead of fresh ``mmap`` s, and the
    heap's free top is never handed back on its own. The pages of a block's activations are then
    faulted in once and reused by every later block, where glibc's default gives them back and
    faults them in again (a cost that varies with what else the machine does); the price is that
    the process keeps its high-water mark (:func:`trim_heap` gives the free pages back)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)
                    and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):
        return False


def fast_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (CUDA with bfloat16 support; a CPU
    with AMX tiles or AVX-512 BF16), so that a bfloat16 statistics pass is faster than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(getattr(torch.cpu, f, lambda: False)()
                   for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


class UnsupportedArchitectureError(ValueError):
    """The model has no block list the pipeline can walk."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(path, blocks)``: the model's list of transformer blocks (e.g. ``"model.layers"``)."""
    for path in ("model.layers", "encoder.layer"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return path, blocks
    best = None  # generic: the largest ModuleList of same-type modules that contain linears
    for path, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or not len(m) or len({type(b) for b in m}) != 1:
            continue
        if not all(any(isinstance(x, (nn.Linear, FactoredLinear)) for x in b.modules()) for b in m):
            continue
        size = (len(m), sum(p.numel() for p in m.parameters()))
        if best is None or size > best[0]:
            best = (size, path, m)
    if best is None:
        raise UnsupportedArchitectureError(
            f"cannot walk {type(model).__name__}: the layer-by-layer pipeline needs the "
            "transformer blocks as an nn.ModuleList of identical modules containing linear "
            "layers (like 'model.layers' in Llama-family decoders or 'encoder.layer' in BERT); "
            "none found")
    return best[1], best[2]


class _Stop(Exception):
    pass


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a linear-like layer applies, detached (``dense_weight()`` or ``weight``)."""
    dense = getattr(layer, "dense_weight", None)
    return (dense() if callable(dense) else layer.weight).detach()


class StandIn(nn.Module):
    """Takes a module's place in the model for a while (``inner``); attribute reads the model
    makes of it (e.g. a block's ``attention_type``, a linear's ``in_features``) reach ``inner``."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


class _Catcher(StandIn):
    """Stands in for block 0: stores its inputs, then stops the forward."""

    def __init__(self, inner: nn.Module, store):
        super().__init__()
        self.inner, self.store = inner, store

    def forward(self, *args, **kwargs):
        self.store(*args, **kwargs)
        raise _Stop


class SameInput:
    """Recognises the very same tensor fed to several layers during one forward pass (q/k/v,
    gate/up share their input). Entries hold a weak reference: a tensor freed in the meantime
    (whose address may be reused) is never mistaken for a new one, and nothing is kept alive."""

    def __init__(self):
        self._seen: dict[int, tuple[weakref.ref, object]] = {}

    def lookup(self, x: torch.Tensor):
        """The value remembered for ``x``, or None."""
        entry = self._seen.get(id(x))
        return entry[1] if entry is not None and entry[0]() is x else None

    def remember(self, x: torch.Tensor, value) -> None:
        self._seen[id(x)] = (weakref.ref(x), value)

    def clear(self) -> None:
        self._seen.clear()


def update_statistics(stats: dict, seen: SameInput, name: str, kinds: frozenset,
                      dtype: torch.dtype, x: torch.Tensor,
                      product_dtype: torch.dtype | None = None) -> None:
    """Add the input ``x`` of layer ``name`` to ``stats[name]`` in chunks (bounds the float64
    copies); ``kinds`` ⊆ {"gram", "mean_abs"} says what a new statistics object tracks (see
    :data:`STAT_KINDS`), ``dtype`` / ``product_dtype`` what it accumulates / multiplies in.
    Linears fed the very same tensor in one block call share one object."""
    shared = seen.lookup(x)
    if shared is not None:
        if stats.setdefault(name, shared) is not shared:
            raise RuntimeError(f"{name}: its input was shared with another layer in one batch "
                               "but not in an earlier one")
        return
    flat = x.reshape(-1, x.shape[-1])
    if name not in stats:
        stats[name] = InputStatistics(flat.shape[-1], dtype, flat.device,
                                      track_gram="gram" in kinds, track_abs="mean_abs" in kinds,
                                      product_dtype=product_dtype)
    for chunk in flat.split(STATS_CHUNK if product_dtype is None else STATS_CHUNK_LOW):
        stats[name].update(chunk)
    seen.remember(x, stats[name])


def _hook(stats, seen, name, kinds, dtype, product_dtype, reached, stop, module, args) -> None:
    update_statistics(stats, seen, name, kinds, dtype, args[0], product_dtype)
    reached.add(name)
    if stop and len(reached) == stop:
        raise _Stop  # every hooked input of this batch is in: the rest of the block is not needed


class BlockRunner:
    """Runs the blocks of one model on buffered hidden states, batch by batch."""

    def __init__(self, model, blocks, windows, batch_size, bar, batch_task):
        self.model, self.blocks, self.bs = model, blocks, batch_size
        self.windows, self.bar, self.task = windows, bar, batch_task
        self.calls, self.inps, self.outs = {}, None, None

    def capture(self) -> None:
        n, T = self.windows.shape
        pos = [0]

        def store(*args, **kwargs):
            h = args[0] if args else kwargs.pop("hidden_states")
            if self.inps is None:
                self.inps = torch.empty(n, T, h.shape[-1], dtype=torch.float32, device=h.device)
            self.inps[pos[0]:pos[0] + len(h)] = h
            pos[0] += len(h)
            self.calls.setdefault(len(h), (bool(args), args[1:], kwargs))

        self.calls, self.inps, self.outs = {}, None, None
        self.blocks[0] = _Catcher(self.blocks[0], store)
        try:
            for s in range(0, n, self.bs):
                try:
                    self.model(input_ids=self.windows[s:s + self.bs], use_cache=False)
                except _Stop:
                    pass
        finally:
            self.blocks[0] = self.blocks[0].inner
        self.outs = torch.empty_like(self.inps)

    def run(self, i: int, what: str, hooks: dict | None = None, keep: bool = False,
            stats_dtype: torch.dtype = torch.float64, precision: torch.dtype | None = None) -> dict:
        """Run block i over all windows with ``hooks`` ({name: kinds}, see :data:`STAT_KINDS`);
        outputs to ``outs``.

        Every statistics object of this run tracks what any hooked layer needs (shared statistics
        must serve every sharer); they accumulate in ``stats_dtype``. Without ``keep`` a batch's
        forward stops as soon as every hooked layer has had its input (e.g. before a Llama
        block's down projection and residual add). ``precision=torch.bfloat16`` (a statistics
        run only): a bfloat16 copy of the block runs under autocast and, for float32 statistics,
        the Gram's products take bfloat16 inputs (accumulating in float32;
        :class:`~slimtune.weights.stats.InputStatistics`); :func:`fast_bfloat16` says where that
        is faster. The block itself is untouched.
        """
        if precision not in (None, torch.bfloat16):
            raise ValueError(f"precision must be None or torch.bfloat16, got {precision}")
        if precision is not None and keep:
            raise ValueError("a bfloat16 run is for statistics only: its outputs are not kept")
        stats, seen, reached, handles = {}, SameInput(), set(), []
        kinds = frozenset().union(*(hooks or {}).values())
        stop = 0 if keep else len(hooks or {})
        product = precision if stats_dtype == torch.float32 else None
        block = self.blocks[i]
        if precision is not None:
            self.blocks[i] = copy.deepcopy(block).to(precision)
        for name in hooks or {}:
            hook = partial(_hook, stats, seen, name, kinds, stats_dtype, product, reached, stop)
            handles.append(self.model.get_submodule(name).register_forward_pre_hook(hook))
        self.bar.reset(self.task, total=len(self.inps), description=f"block {i}: {what}")
        autocast = (torch.autocast(self.inps.device.type, dtype=precision)
                    if precision is not None else contextlib.nullcontext())
        try:
            for s in range(0, len(self.inps), self.bs):
                seen.clear()
                reached.clear()
                try:
                    with autocast:
                        self.forward(i, s, keep)
                except _Stop:
                    pass
                self.bar.advance(self.task, min(self.bs, len(self.inps) - s))
        finally:
            for handle in handles:
                handle.remove()
            self.blocks[i] = block
        return stats

    def forward(self, i: int, s: int, keep: bool = True) -> None:
        """Block ``i`` on the batch of inputs starting at window ``s`` (outputs to ``outs``)."""
        block, h = self.blocks[i], self.inps[s:s + self.bs]
        positional, extra, kwargs = self.calls[len(h)]
        h = h.to(next(block.parameters()).dtype)
        out = block(h, *extra, **kwargs) if positional else block(hidden_states=h, **kwargs)
        if keep:
            self.outs[s:s + len(h)] = out[0] if isinstance(out, (tuple, list)) else out

    def advance(self) -> None:
        self.inps, self.outs = self.outs, self.inps
