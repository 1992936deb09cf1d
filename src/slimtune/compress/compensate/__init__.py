"""Low-rank parts beside a compressed base: ``eora`` repairs what earlier steps lost (in the
eigenspace of the inputs), ``lowrank_first`` keeps a weight's principal part in float before
quantisation, ``lost`` splits a weight into principal part + sparse remainder. One file each."""
