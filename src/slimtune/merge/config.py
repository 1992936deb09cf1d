"""Fields shared by merge-method configs (behaviour is never shared: each method is one file)."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field


class MergeConfig(BaseModel):
    """``method``; unknown keys are errors that list the known ones. A method that merges a fixed
    number of models says so in ``n_models`` (a class variable; None: any number); ``example``
    is a small valid set of its keys (the family's test matrix runs every method with it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    n_models: ClassVar[int | None] = None
    example: ClassVar[dict] = {}
    method: str


def check_model_count(config: MergeConfig, count: int, where: str) -> None:
    """One clear error when the method needs another number of models."""
    if config.n_models is not None and count != config.n_models:
        raise ValueError(f"{where} ({config.method}): merges exactly {config.n_models} models, "
                         f"got {count}")


Density = Field(..., gt=0, le=1, description="fraction of each task vector's entries kept")
Lambda = Field(1.0, alias="lambda", description="scale of the merged task vector")
Majority = Literal["total", "frequency"]
Convention = Literal["mergekit", "peft"]
