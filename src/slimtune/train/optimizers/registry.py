"""The optimiser registry: an optimiser registers ``build(model, config) ->
torch.optim.Optimizer`` with its pydantic config at the bottom of its own file; the optimiser
works on the model's trainable parameters (``requires_grad``) and keeps its state in tensors,
so ``state_dict`` / ``load_state_dict`` resume it exactly. ``conflict(config, adapter) -> str |
None`` (optional) says why the optimiser cannot train with an adapter method (``adapter``: its
config, or None for full training); the loop and the CLI ask before the model loads.
"""
from slimtune.registry import Registry

OPTIMIZERS = Registry("optimizer", required=("build",), optional=("conflict",))
