"""The fields every compression step's config has: ``method`` and ``targets`` (each family's
base config and each method's config add their own; fields are shared, behaviour is not)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from slimtune.targets import check_target_spec


class StepConfig(BaseModel):
    """``method`` and ``targets``; unknown keys are errors that list the known ones."""

    model_config = ConfigDict(extra="forbid")

    method: str
    targets: str | list[str] = Field(
        "all-linear", description="which linears: 'all-linear' (every linear but the LM head), a "
        "list of names (a module matches if its full name equals one or ends with '.' + one), or "
        "a regex that must match the full module name")

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, v):
        return check_target_spec(v)
