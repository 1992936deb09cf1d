"""One forward per block: each target linear is compressed once every calibration batch has reached it.

This is the "true sequential" order of GPTQ (Frantar et al. 2022; the reference code's
``--true-sequential``), applied to every step: a layer's statistics are taken on the inputs that
the already compressed earlier layers *of the same block* produce (o_proj after q/k/v, down_proj
after gate/up), the block's output is the compressed block's, and the block runs once, where
collecting statistics per step and then recomputing the outputs runs it once per step plus once.

:func:`run_staged` runs block ``i`` of a :class:`~slimtune.calib.blocks.BlockRunner` over all its
buffered windows, each batch in its own greenlet (a coroutine with its own stack, on the calling
thread: torch's intra-op threads, allocator and grad mode are the same as in a plain forward).
The target linears are wrapped in gates. A batch reaching a gate whose layer is not compressed yet
adds its input to that layer's statistics and switches back to the controller; when every
unfinished batch waits at the same gate, the statistics are complete, ``compress(name, layer,
inputs)`` returns the layer's replacement, and the batches go on through it (through its dense
weight, computed once). A gate no batch reached is compressed at the end with ``inputs=None``.
(Python threads in place of greenlets were measured 1.4-1.8x slower per matmul on 2 cores: every
thread gets its own OpenMP team and malloc arena.)

Memory: every batch's activations at the gate it waits at are alive together (a Llama block at
the down projection: about 3·hidden + intermediate floats per token), where the per-step order
keeps one batch's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from greenlet import GreenletExit, getcurrent, greenlet
from torch import nn

from slimtune.calib.blocks import BlockRunner, SameInput, StandIn, dense_weight, update_statistics
from slimtune.layers import FactoredLinear
from slimtune.targets import set_module
from slimtune.weights.stats import InputStatistics

Compress = Callable[[str, nn.Module, "InputStatistics | None"], nn.Module]


@dataclass(eq=False)
class _Batch:
    start: int
    task: greenlet | None = None
    seen: SameInput = field(default_factory=SameInput)
    waiting: str | None = None


class _Gate(StandIn):
    """Stands in for one target linear while its block runs staged."""

    def __init__(self, name: str, inner: nn.Module, run: "_Stages"):
        super().__init__()
        self.name, self.inner = name, inner
        self.__dict__["run"] = run  # not a submodule

    def forward(self, x, *args, **kwargs):
        return self.run.arrive(self.name, x, *args, **kwargs)


def _dense_call(layer: nn.Module) -> Callable:
    """``x -> layer(x)`` through the layer's dense weight, computed once (linears only)."""
    if not isinstance(layer, (nn.Linear, FactoredLinear)):
        return layer
    W = dense_weight(layer)
    bias = None if layer.bias is None else layer.bias.detach()

    def call(x):
        out = F.linear(x if x.dtype == W.dtype else x.to(W.dtype), W, bias)
        return out if out.dtype == x.dtype else out.to(x.dtype)
    return call


class _Stages:
    """The gates' shared state: the batch running now, the statistics, the compressed layers."""

    def __init__(self, track: dict[str, frozenset], stats_dtype: torch.dtype):
        self.track, self.dtype = track, stats_dtype
        self.kinds = frozenset().union(*track.values())
        self.stats: dict[str, InputStatistics] = {}
        self.ready: dict[str, Callable] = {}
        self.current: _Batch | None = None
        self.controller = getcurrent()

    def arrive(self, name: str, x, *args, **kwargs):
        if name not in self.ready:
            batch = self.current
            if name in self.track:
                update_statistics(self.stats, batch.seen, name, self.kinds, self.dtype, x)
            batch.waiting = name
            self.controller.switch()
            batch.waiting = None
        return self.ready[name](x, *args, **kwargs)


def run_staged(runner: BlockRunner, i: int, names: list[str], track: dict[str, frozenset],
               stats_dtype: torch.dtype, compress: Compress) -> None:
    """Run block ``i`` once over all windows, compressing ``names`` in the order the forward
    reaches them; ``track`` ({name: kinds ⊆ STAT_KINDS}) says whose inputs are accumulated
    (every statistics object tracks what any of them needs). Outputs go to ``runner.outs``."""
    model, stages = runner.model, _Stages(track, stats_dtype)
    gates = {n: _Gate(n, model.get_submodule(n), stages) for n in names}
    batches = [_Batch(s) for s in range(0, len(runner.inps), runner.bs)]
    for b in batches:
        b.task = greenlet(lambda s=b.start: runner.forward(i, s), parent=stages.controller)
    runner.bar.reset(runner.task, total=len(names), description=f"block {i}: layers")

    def finish(name: str, stats) -> None:
        gate = gates[name]
        gate.inner = compress(name, gate.inner, stats)
        stages.ready[name] = _dense_call(gate.inner)
        runner.bar.advance(runner.task)

    for n, gate in gates.items():
        set_module(model, n, gate)
    try:
        while True:
            for b in batches:
                if not b.task.dead:
                    stages.current = b
                    b.task.switch()  # returns when it waits at a gate or is done
            waiting = {b.waiting for b in batches if not b.task.dead}
            if not waiting:
                break
            if len(waiting) > 1 or any(b.task.dead for b in batches):
                raise RuntimeError(
                    f"block {i}: the calibration batches took different paths through the block "
                    f"(waiting at {sorted(waiting)}); compress it with sequential='block'")
            name = waiting.pop()
            finish(name, stages.stats.get(name))
        for name in names:
            if name not in stages.ready:
                finish(name, None)
    finally:
        for b in batches:
            if b.task is not None and not b.task.dead:
                b.task.throw(GreenletExit)
        for n, gate in gates.items():
            set_module(model, n, gate.inner)
