"""The pytree-transform core: paths and selection, tree split/combine, the method type, wrap and
compose, the train step, sharding derivation and linen interception."""
