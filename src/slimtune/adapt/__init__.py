"""Adapter methods (the LoRA family) on ``FactoredLinear``: ``apply``, ``save``, ``load``,
``merge``, ``to_peft``. One module per method registers itself in :data:`.registry.METHODS` at
the bottom of its own file; importing this package imports each of them once."""
from slimtune.adapt import (corda, dora, eva, lora, lost, milora, olora, pissa,  # noqa: F401
                            sltrain, sorsa, sst, svfit)
from slimtune.adapt.api import (adapter_config, after_step, apply, extra_loss, load, merge,
                                read_manifest, save, trainable_parameters)
from slimtune.adapt.registry import (METHODS, AdapterConfig, get_method, known_methods,
                                     make_config, needs_calibration)
from slimtune.export.peft import to_peft

__all__ = ["METHODS", "AdapterConfig", "adapter_config", "after_step", "apply", "extra_loss",
           "get_method", "known_methods", "load", "make_config", "merge", "needs_calibration",
           "read_manifest", "save", "to_peft", "trainable_parameters"]
