"""The optimiser registry: an optimiser registers ``build(model, config) ->
torch.optim.Optimizer`` with its pydantic config at the bottom of its own file; the optimiser
works on the model's trainable parameters (``requires_grad``) and keeps its state in tensors,
so ``state_dict`` / ``load_state_dict`` resume it exactly.
"""
from slimtune.registry import Registry

OPTIMIZERS = Registry("optimizer", required=("build",))
