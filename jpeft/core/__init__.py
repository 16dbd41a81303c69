"""The pytree-transform core: paths and selection, tree split/combine, contraction sites and the
data-flow backend that edits them, the method type, wrap and compose, the train step, sharding
derivation."""
