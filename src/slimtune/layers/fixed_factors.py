"""Low-rank parts whose frozen factors are regenerated, not stored: only the small trainable
tensors are parameters (and saved); the fixed ones are non-persistent buffers rebuilt from the
part's ``describe()`` (a seed and shapes), so an adapter on disk holds what it trains and nothing
else.

- :class:`ScaledRandomLowRank` (VeRA): ``ΔW = diag(b)·B·diag(d)·A`` with A, B slices of one pair
  of random matrices shared by every layer (``A = A_shared[:, :in]``, ``B = B_shared[:out]``).
- :class:`RandomBasisLowRank` (NOLA): ``ΔW = s·(Σ_j β_j B_j)(Σ_i α_i A_i)`` over seeded random
  bases; only the coefficients α, β train.
- :class:`TiledLowRank` (MiSS): ``ΔW = Dᵀ·T`` with ``T = [I_r I_r ... I_r]`` (r × in, the last
  block cut to the remainder) and D (r × out) trainable: every width-r block of the input is summed
  before one r × out product.

Generated tensors are cached by (what, shape, seed, dtype, device): layers of one model slice the
same storage, as the papers' shared matrices. Each part's ``lora_factors()`` gives ``(B, A)`` with
``ΔW = scale·B·A``, so it exports as an exact PEFT LoRA.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.layers.parts import LOWRANK_KINDS, project_out


@functools.lru_cache(maxsize=64)
def _cached(kind: str, shape: tuple, seed: int, dtype: torch.dtype, device: str):
    made = _GENERATORS[kind](shape, seed)
    if isinstance(made, tuple):
        return tuple(t.to(dtype=dtype, device=device) for t in made)
    return made.to(dtype=dtype, device=device)


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """``U(-b, b)``, ``b = √3·√2/√fan_in`` (``fan_in = shape[1]``), drawn on the CPU in float32:
    ``kaiming_uniform_`` with gain √2, as VeRA's reference (and PEFT) draw the shared pair."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_pair(shape: tuple, seed: int) -> tuple[Tensor, Tensor]:
    """``(A [r, max_in], B [max_out, r])`` drawn in that order from one generator seeded ``seed``."""
    r, max_out, max_in = shape
    g = torch.Generator().manual_seed(seed)
    A = kaiming_uniform((r, max_in), g)
    return A, kaiming_uniform((max_out, r), g)


def nola_bases(shape: tuple, seed: int) -> Tensor:
    """``k`` random matrices of ``shape[1:]`` (``[k, rows, cols]``), ``U(-1/√cols, 1/√cols)``
    (LoRA's A init for each), from a generator seeded by ``seed`` and the shape."""
    k, rows, cols = shape
    g = torch.Generator().manual_seed(seed * 1_000_003 + rows * 7919 + cols)
    bound = 1.0 / math.sqrt(cols)
    return torch.empty(k, rows, cols).uniform_(-bound, bound, generator=g)


_GENERATORS = {"vera": vera_pair, "nola": nola_bases}


def shared(kind: str, shape: tuple, seed: int, like: dict):
    """The generated tensor(s) of ``kind`` for ``shape``/``seed`` in ``like``'s dtype/device."""
    dtype = like.get("dtype") or torch.float32
    device = str(torch.device(like.get("device") or "cpu"))
    return _cached(kind, tuple(shape), int(seed), dtype, device)


def _add(out: Tensor, residual: Tensor | None) -> Tensor:
    return out if residual is None else residual + out


class ScaledRandomLowRank(nn.Module):
    """VeRA's part: ``x ↦ b ⊙ ((d ⊙ (x·Aᵀ))·Bᵀ)``; d ``[r]`` and b ``[out]`` train."""

    kind = "vera"

    def __init__(self, n_in: int, n_out: int, r: int, seed: int, max_shape: tuple[int, int],
                 d: Tensor, b: Tensor):
        super().__init__()
        max_out, max_in = max_shape
        if n_in > max_in or n_out > max_out:
            raise ValueError(f"a {n_out}x{n_in} layer does not fit the shared {max_out}x{max_in}")
        self.seed, self.max_shape = int(seed), (int(max_out), int(max_in))
        A, B = shared("vera", (r, max_out, max_in), seed, {"dtype": d.dtype, "device": d.device})
        self.register_buffer("A", A[:, :n_in], persistent=False)
        self.register_buffer("B", B[:n_out], persistent=False)
        self.d, self.b = nn.Parameter(d), nn.Parameter(b)
        self.scale = 1.0

    @property
    def rank(self) -> int:
        return self.d.numel()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return _add(self.b * F.linear(self.d * F.linear(x, self.A), self.B), residual)

    def delta_weight(self) -> Tensor:
        return (self.b[:, None] * self.B) @ (self.d[:, None] * self.A)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        """``(B', A')`` with ``ΔW = scale·B'·A'`` (an exact LoRA of rank r)."""
        return self.b[:, None] * self.B, self.d[:, None] * self.A

    def describe(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "seed": self.seed,
                "max_shape": list(self.max_shape)}

    @classmethod
    def empty(cls, d: dict, n_in: int, n_out: int, kw: dict) -> "ScaledRandomLowRank":
        return cls(n_in, n_out, d["rank"], d["seed"], tuple(d["max_shape"]),
                   torch.empty(d["rank"], **kw), torch.empty(n_out, **kw))


class RandomBasisLowRank(nn.Module):
    """NOLA's part: ``A = Σ α_i A_i`` (bases ``[k_A, r, in]``), ``B = Σ β_j B_j`` (bases
    ``[k_B, out, r]``), ``x ↦ s·(x·Aᵀ)·Bᵀ``; α ``[k_A]`` and β ``[k_B]`` train."""

    kind = "nola"

    def __init__(self, n_in: int, n_out: int, r: int, seed: int, alpha: Tensor, beta: Tensor,
                 scale: float):
        super().__init__()
        self.seed, self.r, self.scale = int(seed), int(r), float(scale)
        like = {"dtype": alpha.dtype, "device": alpha.device}
        self.register_buffer("A_bases", shared("nola", (alpha.numel(), r, n_in), seed, like),
                             persistent=False)
        self.register_buffer("B_bases", shared("nola", (beta.numel(), n_out, r), seed + 1, like),
                             persistent=False)
        self.alpha, self.beta = nn.Parameter(alpha), nn.Parameter(beta)

    @property
    def rank(self) -> int:
        return self.r

    def factors(self) -> tuple[Tensor, Tensor]:
        A = torch.tensordot(self.alpha, self.A_bases, dims=1)
        return A, torch.tensordot(self.beta, self.B_bases, dims=1)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        A, B = self.factors()
        return project_out(F.linear(x, A), B, self.scale, residual)

    def delta_weight(self) -> Tensor:
        A, B = self.factors()
        return (B @ A) * self.scale

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        """``(B, A)`` with ``ΔW = scale·B·A`` (an exact LoRA of rank r)."""
        A, B = self.factors()
        return B, A

    def describe(self) -> dict:
        return {"kind": self.kind, "rank": self.r, "seed": self.seed, "scale": self.scale,
                "bases": [self.alpha.numel(), self.beta.numel()]}

    @classmethod
    def empty(cls, d: dict, n_in: int, n_out: int, kw: dict) -> "RandomBasisLowRank":
        k_a, k_b = d["bases"]
        return cls(n_in, n_out, d["rank"], d["seed"], torch.empty(k_a, **kw),
                   torch.empty(k_b, **kw), d["scale"])


def tiling(r: int, n_in: int, dtype=None, device=None) -> Tensor:
    """``T [r, in]``: ``T[j mod r, j] = 1`` (identity blocks side by side, the last one cut)."""
    T = torch.zeros(r, n_in, dtype=dtype, device=device)
    j = torch.arange(n_in, device=device)
    T[j % r, j] = 1
    return T


class TiledLowRank(nn.Module):
    """MiSS's part: ``x ↦ (Σ_blocks x_block)·D`` with the input zero-padded to a multiple of r;
    D ``[r, out]`` trains (PEFT's ``miss_block`` layout), or ``[r, m]`` repeated out/m times
    along the output (MiSS's ``mini`` variant: the columns are shared)."""

    kind = "miss"

    def __init__(self, n_in: int, n_out: int, D: Tensor):
        super().__init__()
        if n_out % D.shape[1]:
            raise ValueError(f"MiSS: the output size {n_out} is not a multiple of {D.shape[1]}")
        self.n_in, self.n_out, self.scale = int(n_in), int(n_out), 1.0
        self.D = nn.Parameter(D)

    @property
    def rank(self) -> int:
        return self.D.shape[0]

    def block(self) -> Tensor:
        """D as ``[r, out]``."""
        repeat = self.n_out // self.D.shape[1]
        return self.D if repeat == 1 else self.D.repeat(1, repeat)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        r = self.rank
        pad = (-x.shape[-1]) % r
        if pad:
            x = F.pad(x, (0, pad))
        summed = x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2)
        return _add(summed @ self.block(), residual)

    def delta_weight(self) -> Tensor:
        return self.block().mT @ tiling(self.rank, self.n_in, self.D.dtype, self.D.device)

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        """``(Dᵀ, T)`` with ``ΔW = Dᵀ·T`` (an exact LoRA of rank r)."""
        return self.block().mT, tiling(self.rank, self.n_in, self.D.dtype, self.D.device)

    def describe(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "columns": self.D.shape[1]}

    @classmethod
    def empty(cls, d: dict, n_in: int, n_out: int, kw: dict) -> "TiledLowRank":
        return cls(n_in, n_out, torch.empty(d["rank"], d["columns"], **kw))


for _part in (ScaledRandomLowRank, RandomBasisLowRank, TiledLowRank):
    LOWRANK_KINDS[_part.kind] = _part.empty
