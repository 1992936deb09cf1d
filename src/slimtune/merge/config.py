"""Fields shared by merge-method configs (behaviour is never shared: each method is one file)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MergeConfig(BaseModel):
    """``method``; unknown keys are errors that list the known ones."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    method: str


Density = Field(..., gt=0, le=1, description="fraction of each task vector's entries kept")
Lambda = Field(1.0, alias="lambda", description="scale of the merged task vector")
Majority = Literal["total", "frequency"]
Convention = Literal["mergekit", "peft"]
