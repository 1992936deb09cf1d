"""SLERP (spherical linear interpolation, Shoemake 1985, as used for model merging by mergekit):
of exactly two models W₀ = W_base + τ₀ and W₁ = W_base + τ₁, each tensor flattened to one
vector: ``sin((1−t)θ)/sin θ · W₀ + sin(tθ)/sin θ · W₁`` with θ the angle between them, and plain
``(1−t) W₀ + t W₁`` where they are (anti)parallel (|cos θ| > 0.9995). Needs the base tensor
(the result is not a function of the task vectors alone); the models' weights are not used.
Equal to mergekit 0.1.5's ``slerp`` with ``base_model`` the first model (tests). A tensor too
large for memory is streamed in ranges of rows (hook ``stream``): one pass for the three dot
products, then the same interpolation row by row.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from slimtune.merge.config import MergeConfig
from slimtune.merge.registry import MERGES

PARALLEL = 0.9995  # |cos θ| above which the interpolation is linear
EPS = 1e-8


class SlerpConfig(MergeConfig):
    n_models: ClassVar[int] = 2
    example: ClassVar[dict] = {"t": 0.3}
    method: Literal["slerp"] = "slerp"
    t: float = Field(..., ge=0, le=1, description="0: the first model, 1: the second")


def float64_products(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> tuple:
    """``(a·a, b·b, a·b)`` accumulated in float64 a chunk at a time: a float32 norm of a
    28M-entry embedding is off by 0.2% (measured on SmolLM2's), enough to move θ visibly."""
    aa = bb = ab = 0.0
    for start in range(0, a.numel(), chunk):
        x, y = a[start:start + chunk].double(), b[start:start + chunk].double()
        aa, bb, ab = aa + float(x @ x), bb + float(y @ y), ab + float(x @ y)
    return aa, bb, ab


def endpoints(stacked: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    return tuple(base.to(dtype) + d.to(dtype) for d in stacked)


def interpolate(v0: torch.Tensor, v1: torch.Tensor, products: tuple, t: float) -> torch.Tensor:
    """The slerp of ``v0`` and ``v1`` (or of ranges of their rows) at ``t``, given the dot
    products ``(v0·v0, v1·v1, v0·v1)`` of the whole tensors."""
    aa, bb, ab = products
    na, nb = (n if n > EPS else 1.0 for n in (aa ** 0.5, bb ** 0.5))
    cos = torch.tensor(ab / (na * nb)).clamp(-1, 1)
    if cos.abs() > PARALLEL:
        return (1 - t) * v0 + t * v1
    theta = torch.acos(cos)
    return (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)


def merge(stacked: torch.Tensor, weights: torch.Tensor, config: SlerpConfig, generator=None,
          base: torch.Tensor | None = None) -> torch.Tensor:
    if base is None:
        raise ValueError("slerp needs the base tensor (merge_deltas(..., base=...))")
    v0, v1 = endpoints(stacked, base)
    merged = interpolate(v0, v1, float64_products(v0.reshape(-1), v1.reshape(-1)), config.t)
    return (merged - base.to(v0.dtype)).to(stacked.dtype)


class SlerpStream:
    """One pass summing the dot products, then :func:`interpolate` range by range."""

    def __init__(self, config: SlerpConfig):
        self.config, self.products, self.passes, self.whole = config, (0.0, 0.0, 0.0), 0, False

    def wants_pass(self) -> bool:
        return self.passes < 1

    def observe(self, stacked: torch.Tensor, base: torch.Tensor) -> None:
        v0, v1 = endpoints(stacked, base)
        part = float64_products(v0.reshape(-1), v1.reshape(-1))
        self.products = tuple(a + b for a, b in zip(self.products, part))

    def end_pass(self) -> None:
        self.passes += 1

    def merge_rows(self, stacked: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        v0, v1 = endpoints(stacked, base)
        return (interpolate(v0, v1, self.products, self.config.t) - base.to(v0.dtype)
                ).to(stacked.dtype)


MERGES.register("slerp", SlerpConfig, merge=merge,
                stream=lambda config, weights, shape, generator=None: SlerpStream(config))
