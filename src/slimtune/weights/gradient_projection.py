"""GaLore's gradient projection (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection"): a weight's gradient ``G`` (m × n) is projected onto the top-``r``
singular vectors of a recent gradient, the optimiser's moments live in that r-dimensional space,
and the update is projected back. Pure tensor functions on the gradient's own device.

- :func:`projection_side`: ``"right"`` (``G·Pᵀ``, P = the top-r right singular vectors, r × n)
  or ``"left"`` (``Pᵀ·G``, P = the top-r left ones, m × r). ``std`` projects on the smaller
  side (right when m ≥ n), as galore-torch does.
- :func:`orthogonal_basis`: P from an exact SVD (float32, float64 for float64 gradients),
  returned in the gradient's dtype.
- :func:`project` / :func:`project_back`: ``G ↦ G·Pᵀ`` / ``R ↦ R·P`` (right), ``Pᵀ·G`` / ``P·R``
  (left).
"""
from __future__ import annotations

from typing import Literal

import torch

ProjType = Literal["std", "left", "right"]


def projection_side(shape: tuple[int, ...], proj_type: ProjType) -> Literal["left", "right"]:
    if len(shape) != 2:
        raise ValueError(f"GaLore projects matrices, got a gradient of shape {list(shape)}")
    if proj_type == "std":
        return "right" if shape[0] >= shape[1] else "left"
    if proj_type not in ("left", "right"):
        raise ValueError(f"proj_type must be 'std', 'left' or 'right', got {proj_type!r}")
    return proj_type


def orthogonal_basis(grad: torch.Tensor, rank: int, side: Literal["left", "right"]
                     ) -> torch.Tensor:
    """The top-``rank`` right (``[rank, n]``) or left (``[m, rank]``) singular vectors of
    ``grad``."""
    work = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
    U, _, Vh = torch.linalg.svd(work, full_matrices=False)
    basis = Vh[:rank] if side == "right" else U[:, :rank]
    return basis.to(grad.dtype)


def project(grad: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return grad @ basis.T if side == "right" else basis.T @ grad


def project_back(low: torch.Tensor, basis: torch.Tensor, side: str) -> torch.Tensor:
    return low @ basis if side == "right" else basis @ low
