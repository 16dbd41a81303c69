"""Gates: UniPELT's per-example mixing weights, ``G = mean_tokens sigmoid(x W_g + b_g)``.

UniPELT (Mao et al., 2022) multiplies each sub-method's contribution by a gate computed from the
sublayer's input ``x [B, T, d]``: a linear map to ``g`` values, a sigmoid, and (as AdapterHub's
implementation) the mean over the tokens, so each example gets ``g`` numbers in ``[0, 1]``. Gated
LoRA computes the same from its contraction's input (:func:`jpeft.methods.lora.example_gate`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft.core import contraction

#: Standard deviation of a gate's weight at ``init`` (its bias starts at 0, the gate near 0.5).
STD = 0.02


def example_gates(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """``mean_T sigmoid(x W + b)``: ``x [B, ..., d]``, ``W [d, g]``, ``b [g]`` -> ``[B, g]``,
    values in ``[0, 1]`` (computed in float32)."""
    z = jax.nn.sigmoid(contraction.dense(x.astype(jnp.float32), w.astype(jnp.float32))
                       + b.astype(jnp.float32))
    return z.reshape(z.shape[0], -1, z.shape[-1]).mean(axis=1)
