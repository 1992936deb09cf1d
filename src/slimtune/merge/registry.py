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
- ``elementwise(config) -> bool``: the result at an entry depends only on the (trimmed) task
  vectors at that entry, so a model-level merge may hand ``merge`` a range of rows at a time.
- ``trim(config) -> ("model", density) | None``: the method starts with a magnitude trim over
  each model's whole flattened task vector; a model-level merge does it from streamed exact
  thresholds and then calls ``merge(..., trimmed=True)`` (:mod:`slimtune.merge.dense`). Without
  ``trimmed`` the method trims itself.
- ``stream(config, weights, shape, generator) -> TensorStream | None``: the method merges a
  tensor too large for memory range of rows by range of rows, after counting passes over it.
  The stream has ``wants_pass() -> bool`` (another counting pass is needed), ``observe(stacked,
  base)`` (one range of rows of the task vectors ``[k, rows, ...]`` and of the base, in order),
  ``end_pass()``, ``whole`` (True: merge this tensor whole with ``merge`` after all) and
  ``merge_rows(stacked, base)`` (the merged task vector of one range, the ranges in order). It
  must give what ``merge`` gives on the whole tensor (the family's tests check it).
"""
from slimtune.registry import Registry

MERGES = Registry("merge method", required=("merge",),
                  optional=("merge_factors", "elementwise", "trim", "stream"))
