"""Parts of a ``FactoredLinear`` besides its base: the low-rank ``s·B·K·A`` (:class:`LowRank`),
the sparse delta (:class:`SparseDelta`) and whole-weight transforms (:class:`WeightNormScale`,
DoRA's magnitude over the row norm), with the builders that rebuild empty ones from a layer's
``describe()`` output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def project_out(h: Tensor, B: Tensor, scale: float, residual: Tensor | None) -> Tensor:
    """``s·h·Bᵀ``, added to ``residual`` in the same kernel (addmm) when given."""
    if residual is None:
        return F.linear(h, B) * scale
    rows = residual.shape[:-1].numel()  # explicit: rank 0 (all pruned) leaves h empty
    out = torch.addmm(residual.reshape(rows, residual.shape[-1]), h.reshape(rows, h.shape[-1]),
                      B.mT, alpha=scale)
    return out.view(residual.shape)


class LowRank(nn.Module):
    """s·B·K·A with K absent, diagonal (a vector of r) or full (r × r).

    ``grad_scale`` (optional buffer ``[r]``) multiplies the gradient that reaches component i
    (row i of A, column i of B) without changing any value: 0 freezes a component, 1 trains it
    as usual (SST trains only its sampled singular-vector pairs this way). The core is not
    scaled. It is part of the layer's state, so it is saved and restored with the factors."""

    def __init__(self, A: Tensor, B: Tensor, scale: float = 1.0, core: Tensor | None = None,
                 train_A: bool = True, train_B: bool = True, train_core: bool = True,
                 grad_scale: Tensor | None = None):
        super().__init__()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"low-rank factors must be A (r×in), B (out×r); got {tuple(A.shape)}, "
                             f"{tuple(B.shape)}")
        r = A.shape[0]
        if core is not None and tuple(core.shape) not in ((r,), (r, r)):
            raise ValueError(f"core must have shape ({r},) or ({r}, {r}); got {tuple(core.shape)}")
        self.A = nn.Parameter(A, requires_grad=train_A)
        self.B = nn.Parameter(B, requires_grad=train_B)
        self.core = None if core is None else nn.Parameter(core, requires_grad=train_core)
        self.scale = float(scale)
        if grad_scale is not None and tuple(grad_scale.shape) != (r,):
            raise ValueError(f"grad_scale must have shape ({r},); got {tuple(grad_scale.shape)}")
        self.register_buffer("grad_scale", grad_scale)
        self.active_rank: int | None = None  # runtime only: use the first components (DyLoRA)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def use_rank(self, b: int | None) -> None:
        """Use only the first ``b`` components (rows of A, columns of B, entries of a core) in
        forward, ``delta_weight`` and merge; ``None`` uses all. Not saved: a runtime choice."""
        if b is not None and not 1 <= b <= self.rank:
            raise ValueError(f"rank {b} is not in [1, {self.rank}]")
        self.active_rank = None if b == self.rank else b

    @property
    def core_kind(self) -> str:
        return "none" if self.core is None else ("diag" if self.core.dim() == 1 else "full")

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` as the forward uses them: the parameters themselves, or with
        ``grad_scale`` the same values (``p + (p - p)·c`` is exactly ``p``) whose gradient is
        scaled per component."""
        A, B, c = self.A, self.B, self.grad_scale
        b = self.active_rank
        if b is not None:
            A, B, c = A[:b], B[:, :b], None if c is None else c[:b]
        if c is None:
            return A, B
        A0, B0 = A.detach(), B.detach()
        return A0 + (A - A0) * c[:, None], B0 + (B - B0) * c

    def core_used(self) -> Tensor | None:
        """The core as forward uses it (its leading ``active_rank`` block)."""
        K, b = self.core, self.active_rank
        if K is None or b is None:
            return K
        return K[:b] if K.dim() == 1 else K[:b, :b]

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """s·(x·Aᵀ·Kᵀ)·Bᵀ, added to ``residual`` in the same kernel (addmm) when given."""
        A, B = self.factors()
        K = self.core_used()
        h = F.linear(x, A)
        if K is not None:
            h = h * K if K.dim() == 1 else F.linear(h, K)
        return project_out(h, B, self.scale, residual)

    def delta_weight(self) -> Tensor:
        A, B = self.factors()
        K = self.core_used()
        if K is not None:
            B = B * K if K.dim() == 1 else B @ K
        return (B @ A) * self.scale


class SparseDelta(nn.Module):
    """A sparse out × in update: fixed flat indices, trainable values. Frozen, it can also be a
    layer's ``origin`` (SaRA's merged updates); it then describes itself with its ``kind``."""

    kind = "sparse"

    def __init__(self, shape: tuple[int, int], indices: Tensor, values: Tensor, trainable=True):
        super().__init__()
        if indices.shape != values.shape or indices.dim() != 1:
            raise ValueError("sparse indices and values must be 1-D tensors of equal length")
        self.shape = tuple(shape)
        self.register_buffer("indices", indices.to(torch.long))
        self.values = nn.Parameter(values, requires_grad=trainable)

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def describe(self) -> dict:
        return {"kind": self.kind, "nnz": self.nnz}

    def delta_weight(self) -> Tensor:
        flat = self.values.new_zeros(self.shape[0] * self.shape[1])
        return flat.index_add(0, self.indices, self.values).view(self.shape)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        out = F.linear(x, self.delta_weight())
        return out if residual is None else residual + out


# kind -> builder(description, n_in, n_out, {"dtype", "device"}) of an empty low-rank part of
# another class than LowRank (layers/fixed_factors.py and nested_lowrank.py register theirs) or of a
# frozen sparse delta recorded where low-rank parts are (an origin)
LOWRANK_KINDS: dict = {
    SparseDelta.kind: lambda d, n_in, n_out, kw: SparseDelta(
        (n_out, n_in), torch.zeros(d["nnz"], dtype=torch.long, device=kw.get("device")),
        torch.empty(d["nnz"], **kw), trainable=False)}


def describe_lowrank(lowrank: nn.Module) -> dict:
    """The structure of a low-rank part, as ``FactoredLinear.describe`` records it (a part of
    another class describes itself, with its ``kind``)."""
    if not isinstance(lowrank, LowRank):
        return lowrank.describe()
    d = {"rank": lowrank.rank, "core": lowrank.core_kind, "scale": lowrank.scale}
    return d if getattr(lowrank, "grad_scale", None) is None else {**d, "grad_scale": True}


def empty_lowrank(d: dict, n_in: int, n_out: int, kw: dict) -> nn.Module:
    if "kind" in d:
        if d["kind"] not in LOWRANK_KINDS:
            raise ValueError(f"unknown low-rank part kind {d['kind']!r}; known: "
                             f"{sorted(LOWRANK_KINDS)}")
        return LOWRANK_KINDS[d["kind"]](d, n_in, n_out, kw)
    r, core = d["rank"], d["core"]
    K = {"none": None, "diag": torch.empty(r, **kw), "full": torch.empty(r, r, **kw)}[core]
    c = torch.ones(r, **kw) if d.get("grad_scale") else None
    return LowRank(torch.empty(r, n_in, **kw), torch.empty(n_out, r, **kw), d["scale"], K,
                   grad_scale=c)


class WeightNormScale(nn.Module):
    """DoRA's transform: ``g = m / ||W||_row`` with ``W`` the layer's combined weight.

    The norm is per output row of ``W [out, in]`` and detached from the graph (DoRA §4.3: treat
    ``||V + ΔV||_c`` as a constant), so only ``m`` and the low-rank factors receive gradients.
    """

    kind = "weight_norm_scale"

    def __init__(self, magnitude: Tensor, trainable: bool = True):
        super().__init__()
        self.magnitude = nn.Parameter(magnitude, requires_grad=trainable)

    def output_scale(self, layer: "FactoredLinear") -> Tensor:
        norm = torch.linalg.vector_norm(layer.combined_weight(), dim=1).detach()
        return self.magnitude / norm

    def describe(self) -> dict:
        return {"kind": self.kind}


TRANSFORMS = {WeightNormScale.kind: lambda d, n_out, **kw: WeightNormScale(torch.empty(n_out, **kw))}


def build_transform(d: dict, n_out: int | None = None, **kw) -> nn.Module:
    if d.get("kind") not in TRANSFORMS:
        raise ValueError(f"unknown transform kind {d.get('kind')!r}; known: {sorted(TRANSFORMS)}")
    return TRANSFORMS[d["kind"]](d, n_out, **kw)
