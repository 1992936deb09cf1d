"""Adapter methods (the LoRA family and the frugal, adaptive and sparse adapters) on
``FactoredLinear``: ``apply``, ``save``, ``load``, ``merge``, ``use_rank``, ``to_peft``. One module
per method registers itself in :data:`.registry.METHODS` at the bottom of its own file; importing
this package imports each of them once."""
from slimtune.adapt import (adalora, allora, ba_lora, corda, dora, dsee,  # noqa: F401
                            dylora, eva, ggpo, increlora, loldu, lora, lora_sb, lora_xs, lost,
                            milora, miss, nola, olora, pissa, sara, sft, sltrain, sora, sorsa,
                            sst, svfit, vera)
from slimtune.adapt.api import (adapter_config, after_backward, after_step, apply, before_step,
                                check_layers, check_rank, extra_loss, finish, load, merge,
                                method_state, read_manifest, save, trainable_parameters,
                                use_rank)
from slimtune.adapt.registry import (METHODS, AdapterConfig, get_method, known_methods,
                                     make_config, needs_calibration)
from slimtune.export.peft import to_peft

__all__ = ["METHODS", "AdapterConfig", "adapter_config", "after_backward", "after_step", "apply",
           "before_step", "check_layers", "check_rank", "extra_loss", "finish", "get_method",
           "known_methods", "load", "make_config", "merge", "method_state", "needs_calibration",
           "read_manifest", "save", "to_peft", "trainable_parameters", "use_rank"]
