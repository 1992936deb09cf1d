"""Weight quantisation steps: every targeted weight becomes b-bit integers on a per-(row, group)
grid, stored packed (:class:`slimtune.layers.PackedQuantBase`). One file per method
(:mod:`.rtn`, :mod:`.gptq`); shared config fields and the pipeline step in :mod:`.common`."""
