"""The merge-method registry: a method registers ``merge(stacked, weights, config, generator,
base=None) -> Tensor`` with its pydantic config at the bottom of its own file. ``stacked`` is the
task vectors of one tensor, ``[k, *shape]``; ``weights`` the models' weights, ``[k, 1, ...]``
(broadcastable); ``generator`` a seeded ``torch.Generator`` on their device for the methods that
draw random numbers; ``base`` the base tensor (only methods that need it, such as ``slerp``,
read it). It returns the merged task vector (the caller adds it to the base)."""
from slimtune.registry import Registry

MERGES = Registry("merge method", required=("merge",))
