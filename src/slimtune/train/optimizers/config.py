"""Keys shared by optimiser configs (behaviour is never shared: each optimiser is one file).
Every Adam-based optimiser takes AdamW's own keys: ``lr``, ``betas``, ``eps``,
``weight_decay``."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class OptimizerConfig(BaseModel):
    """``method``; unknown keys are errors that list the known ones."""

    model_config = ConfigDict(extra="forbid")

    method: str
    lr: float = Field(1e-3, gt=0, description="learning rate (the loop's schedule scales it)")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")


def betas_in_range(value: tuple[float, float]) -> tuple[float, float]:
    if not all(0 <= b < 1 for b in value):
        raise ValueError(f"betas must lie in [0, 1), got {value}")
    return value


class AdamKeys(OptimizerConfig):
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        return betas_in_range(value)


def trainable(model) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to optimise: the model has no trainable parameters")
    return params
