"""Mixed precision: the dtype a delta is stored and trained in, and the dtype its path computes in.

A low-precision or quantized base (bfloat16, float16, 8-bit floats, integers) does not make a good
dtype for the few parameters being trained: bfloat16 keeps 8 bits of mantissa, so an Adam step of
``1e-4`` relative size rounds away on most entries of a factor (``tests/core/test_precision.py``
measures it). Following Hugging Face PEFT's ``autocast_adapter_dtype``, a delta created along a
weight defaults to float32 when the weight is of lower precision, and to the weight's own dtype
otherwise; the adapter's products run in the delta's dtype (the activations are cast up, the
result cast back to the base output's dtype), unless a compute dtype is given.

Methods take ``dtype=None`` (:func:`delta_dtype`) and ``compute_dtype=None`` (:func:`compute_dtype`)
and save both in their config, so a rebuilt method creates and computes exactly as the saved one.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def _name(dtype) -> str | None:
    return None if dtype is None else jnp.dtype(dtype).name


def delta_dtype(weight_dtype: Any, dtype: Any = None) -> jnp.dtype:
    """The dtype of a delta laid out along a weight of ``weight_dtype``: ``dtype`` when given;
    otherwise float32 for a weight below 32-bit float precision (bf16, f16, 8-bit floats,
    integers: a quantized base), and the weight's dtype for float32/float64 weights."""
    if dtype is not None:
        d = jnp.dtype(dtype)
        if not jnp.issubdtype(d, jnp.floating):
            raise ValueError(f"a delta's dtype must be a floating dtype, got {d.name}")
        return d
    w = jnp.dtype(weight_dtype)
    if jnp.issubdtype(w, jnp.floating) and w.itemsize >= 4:
        return w
    return jnp.dtype(jnp.float32)


def compute_dtype(delta: Any, dtype: Any = None) -> jnp.dtype:
    """The dtype an adapter's products run in: ``dtype`` when given, else the delta's own."""
    return jnp.dtype(dtype) if dtype is not None else jnp.dtype(delta.dtype)


def config(dtype: Any, compute: Any) -> dict:
    """The policy as saved in a method's config (``None``: the defaults above)."""
    return {"dtype": _name(dtype), "compute_dtype": _name(compute)}
