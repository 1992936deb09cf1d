"""The compression-method registry: a method registers ``build(config) -> BlockStep`` (a step of
:func:`slimtune.calib.run_pipeline`) with its pydantic config, at the bottom of its own file;
optionally ``check_layer(config, name, layer)``, which raises ``ValueError`` for a targeted layer
the step cannot handle (run for every target once the model is loaded, before any work)."""
from slimtune.registry import Registry

METHODS = Registry("compression method", required=("build",), optional=("check_layer",))
