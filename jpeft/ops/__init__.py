"""Small array-level building blocks shared by several methods (pure ``jax.numpy`` functions)."""
