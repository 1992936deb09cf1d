"""Low-rank compression: every targeted weight becomes ``B·A`` of an allocated rank.

One file per method (:mod:`.svd`, :mod:`.fwsvd`, :mod:`.asvd`, :mod:`.svd_llm`), the shared
steps and factor-to-layer code (:mod:`.steps`), rank allocation (:mod:`.allocation`) and the
shared config fields (:mod:`.config`).
"""
