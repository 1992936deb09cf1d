"""The compression-method registry: a method registers ``build(config) -> BlockStep`` (a step of
:func:`slimtune.calib.run_pipeline`) with its pydantic config, at the bottom of its own file."""
from slimtune.registry import Registry

METHODS = Registry("compression method", required=("build",))
