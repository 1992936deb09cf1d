"""The config fields every low-rank compression method shares (each method's config adds its own;
no inheritance of behaviour, only of these fields)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from slimtune.compress.config import StepConfig


class LowRankConfig(StepConfig):
    """Fields shared by the low-rank compression methods (each method's config adds its own)."""

    ratio: float = Field(
        ..., strict=True, description="fraction of the targeted parameters KEPT, in (0, 1): a "
        "rank-k factorisation of an out x in matrix keeps k*(out+in) parameters; uniform "
        "allocation uses k = rank_for_ratio(out, in, ratio)")
    allocation: Literal["uniform", "welore", "sensitivity"] = Field(
        "uniform", description="uniform: same ratio per matrix; welore: one global threshold on "
        "normalised singular values; sensitivity: per-matrix ratios minimising the summed "
        "calibration loss (needs the input Gram; two passes)")
    candidates: list[float] | None = Field(
        None, description="sensitivity only: candidate per-matrix ratios in (0, 1] (1 = stays "
        "dense); default 0.2, 0.3, ..., 0.9, 1.0, plus `ratio` itself")
    svd: Literal["exact", "randomized"] = Field(
        "exact", description="exact SVD (default) or the randomized range finder (Halko et al. "
        "2011) for the final rank-k factorisation; allocation always measures with exact SVD")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v):
        if not 0 < v < 1:
            raise ValueError(f"must be in (0, 1), got {v} "
                             "(the fraction of the targeted parameters kept)")
        return v

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v):
        if v is not None:
            if not v:
                raise ValueError("must be a non-empty list of ratios in (0, 1]")
            bad = [c for c in v if not 0 < c <= 1]
            if bad:
                raise ValueError(f"every candidate must be in (0, 1], got {bad[0]}")
        return v

    @model_validator(mode="after")
    def _candidates_need_sensitivity(self):
        if self.candidates is not None and self.allocation != "sensitivity":
            raise ValueError(f"candidates: only used with allocation: sensitivity (got "
                             f"allocation: {self.allocation})")
        return self
