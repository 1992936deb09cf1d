"""Adapter methods (the LoRA family) on ``FactoredLinear``: ``apply``, ``save``, ``load``,
``merge``; one module per method registers itself on import (see :mod:`.registry`)."""
from slimtune.adapt.api import (adapter_config, after_step, apply, extra_loss, load, merge,
                                read_manifest, save, trainable_parameters)
from slimtune.adapt.registry import AdapterConfig, get_method, known_methods, register
from slimtune.adapt.peft_export import to_peft

from slimtune.adapt import corda, dora, eva, lora, milora, olora, pissa, sorsa, svfit  # noqa: E402,F401

__all__ = ["AdapterConfig", "adapter_config", "after_step", "apply", "extra_loss", "get_method",
           "known_methods", "load", "merge", "read_manifest", "register", "save",
           "to_peft", "trainable_parameters"]
