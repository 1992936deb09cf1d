"""Pruning steps: every targeted weight loses a fraction of its entries (unstructured or N:M),
kept as zeros in its dense base with a bitmask (:mod:`.common`). One file per method
(:mod:`.magnitude`, :mod:`.wanda`, :mod:`.sparsegpt`)."""
