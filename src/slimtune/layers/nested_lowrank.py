"""A low-rank part whose leading components form a usable adapter at every rank (DyLoRA).

    ΔW_b = s_b · B[:, :b] · A[:b],   s_b = alpha / b   (alpha / sqrt(b) with ``rslora``)

:class:`NestedLowRank` holds A ``[r, in]`` and B ``[out, r]`` like ``LowRank``, plus two runtime
choices of b (neither is saved):

- ``sampled``: the rank of the current training step. It applies only while the module is in
  training mode, so an evaluation inside the training loop sees the evaluation rank. With
  ``update="last"`` only the b-th component receives gradient (the first b - 1 are detached).
- ``active_rank`` (:meth:`use_rank`): the rank used outside training (None: all r).

The update at the rank in use is an exact LoRA (``lora_factors``), so the part exports to PEFT.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.layers.parts import LOWRANK_KINDS, project_out


class NestedLowRank(nn.Module):
    """``x ↦ s_b·(x·A[:b]ᵀ)·B[:, :b]ᵀ`` with b the rank in use (see the module docstring)."""

    kind = "nested"

    def __init__(self, A: Tensor, B: Tensor, alpha: float, rslora: bool = False,
                 update: str = "last"):
        super().__init__()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"low-rank factors must be A (r×in), B (out×r); got {tuple(A.shape)}, "
                             f"{tuple(B.shape)}")
        if update not in ("last", "all"):
            raise ValueError(f"update must be 'last' or 'all', got {update!r}")
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        self.alpha, self.rslora, self.update = float(alpha), bool(rslora), update
        self.sampled: int | None = None
        self.active_rank: int | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def _check(self, b: int | None) -> int | None:
        if b is not None and not 1 <= b <= self.rank:
            raise ValueError(f"rank {b} is not in [1, {self.rank}]")
        return b

    def sample(self, b: int | None) -> None:
        """The training step's rank (None: the evaluation rank in training too)."""
        self.sampled = self._check(b)

    def use_rank(self, b: int | None) -> None:
        """Use the first ``b`` components outside training (None: all)."""
        self.active_rank = self._check(b)

    def rank_in_use(self) -> int:
        if self.training and self.sampled is not None:
            return self.sampled
        return self.rank if self.active_rank is None else self.active_rank

    @property
    def scale(self) -> float:
        b = self.rank_in_use()
        return self.alpha / (math.sqrt(b) if self.rslora else b)

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A[:b], B[:, :b])``; in a sampled training step with ``update="last"`` the first
        b - 1 components are detached, so only the b-th one trains."""
        b = self.rank_in_use()
        A, B = self.A[:b], self.B[:, :b]
        if self.training and self.sampled is not None and self.update == "last" and b > 1:
            A = torch.cat([A[:-1].detach(), A[-1:]])
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], dim=1)
        return A, B

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        A, B = self.factors()
        return project_out(F.linear(x, A), B, self.scale, residual)

    def delta_weight(self) -> Tensor:
        A, B = self.factors()
        return (B @ A) * self.scale

    def lora_factors(self) -> tuple[Tensor, Tensor]:
        """``(B[:, :b], A[:b])`` with ``ΔW = scale·B·A`` at the rank in use."""
        A, B = self.factors()
        return B, A

    def describe(self) -> dict:
        return {"kind": self.kind, "rank": self.rank, "alpha": self.alpha,
                "rslora": self.rslora, "update": self.update}

    @classmethod
    def empty(cls, d: dict, n_in: int, n_out: int, kw: dict) -> "NestedLowRank":
        return cls(torch.empty(d["rank"], n_in, **kw), torch.empty(n_out, d["rank"], **kw),
                   d["alpha"], d["rslora"], d["update"])


LOWRANK_KINDS[NestedLowRank.kind] = NestedLowRank.empty
