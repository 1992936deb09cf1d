"""The merge-method registry: a method registers ``merge(stacked, weights, config, generator,
base=None) -> Tensor`` with its pydantic config at the bottom of its own file. ``stacked`` is the
task vectors of one tensor, ``[k, *shape]``; ``weights`` the models' weights, ``[k, 1, ...]``
(broadcastable); ``generator`` a seeded ``torch.Generator`` on their device for the methods that
draw random numbers; ``base`` the base tensor (only methods that need it, such as ``slerp``,
read it). It returns the merged task vector (the caller adds it to the base).

Optional hooks:

- ``merge_factors(factors, weights, config, generator) -> (B, A)``: the method merges LoRA
  adapters in factored form (``factors``: one ``(Bᵢ, Aᵢ)`` per model, ``ΔWᵢ = Bᵢ·Aᵢ``;
  ``weights``: 1-D), :mod:`slimtune.merge.factored`.
- ``elementwise(config) -> bool``: the result at an entry depends only on the task vectors at
  that entry, so a model-level merge may hand ``merge`` a range of rows at a time.
- ``global_trim(config) -> float | None``: the density of a trim over each model's whole
  flattened task vector, applied by the caller before ``merge`` (None: no such trim).
"""
from slimtune.registry import Registry

MERGES = Registry("merge method", required=("merge",),
                  optional=("merge_factors", "elementwise", "global_trim"))
