"""Next-token cross-entropy from the hidden states and the LM head, in vocabulary chunks.

For hidden states ``h`` ``[N, H]`` (any leading axes), the head's kernel ``W`` ``[H, V]``, labels
``y`` ``[N]`` and weights ``w`` ``[N]`` (a mask; all ones by default)::

    loss = sum_n w_n (logsumexp_v (h_n W)_v - (h_n W)_{y_n}) / max(sum_n w_n, 1)

computed without forming the logits ``[N, V]`` or their cotangent. The forward pass runs over
chunks of ``chunk`` vocabulary columns, keeping a running log-sum-exp per position and the label's
logit; the backward pass recomputes each chunk's logits ``h W_c`` (float32), forms
``d_c = (softmax_c - onehot_c) w / sum(w)`` ``[N, C]``, adds ``d_c W_c^T`` to the hidden states'
cotangent and gives ``h^T d_c``, the head's gradient on those columns. Memory for the loss: a few
``[N, C]`` buffers instead of several ``[N, V]`` ones (logits, softmax, their cotangents); compute:
the head's product once more (the backward pass recomputes the logits).

Under :func:`jpeft.lomo.make_step` the head's update is applied chunk by chunk inside that loop
(LOMO; AdaLomo, whose rule needs the whole tensor, gets the gradient whole): the step then holds
neither the logits' cotangent nor the head's gradient, the two vocabulary-sized buffers of the
backward pass. Elsewhere (``jax.grad``, :func:`jpeft.make_train_step`) the head's gradient is
returned whole, as any gradient.

Usage (a decoder whose body gives the hidden states)::

    hidden = body(params, tokens)                                   # [B, T, H]
    loss = jpeft.lm_cross_entropy(hidden[:, :-1], params["lm_head"]["kernel"], tokens[:, 1:])
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

f32 = jnp.float32

#: The name of the ``jit`` that holds the loss: :mod:`jpeft.lomo` finds the head's kernel by it.
NAME = "jpeft_lm_cross_entropy"


def lm_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array,
                     mask: jax.Array | None = None, *, chunk: int = 4096) -> jax.Array:
    """The mean next-token cross-entropy of ``hidden @ kernel`` against ``labels`` (module
    docstring), in vocabulary chunks of ``chunk`` columns.

    Args:
      hidden: ``[..., H]`` hidden states (any float dtype; products accumulate in float32).
      kernel: ``[H, V]`` the LM head's kernel (no bias).
      labels: ``[...]`` integer labels in ``[0, V)``; a label outside it makes the loss NaN
        unless its position's weight is 0 (Hugging Face's ``-100``: pass ``mask=labels !=
        -100``).
      mask: ``[...]`` weights (1 for a position counted, 0 for padding); ``None``: all ones.
      chunk: vocabulary columns per chunk (the last chunk is narrower when it does not divide
        ``V``).

    Returns:
      the float32 scalar loss.

    Raises:
      ValueError: shapes that do not fit, or a non-positive ``chunk``.
    """
    if kernel.ndim != 2 or hidden.shape[-1] != kernel.shape[0]:
        raise ValueError(f"lm_cross_entropy: kernel must be [H, V] with H = hidden's last axis "
                         f"({hidden.shape[-1]}); got {kernel.shape}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"lm_cross_entropy: labels {labels.shape} must match hidden's leading "
                         f"axes {hidden.shape[:-1]}")
    if mask is not None and mask.shape != labels.shape:
        raise ValueError(f"lm_cross_entropy: mask {mask.shape} must match labels {labels.shape}")
    if not (isinstance(chunk, int) and chunk > 0):
        raise ValueError(f"lm_cross_entropy: chunk must be a positive int, got {chunk!r}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).astype(jnp.int32)
    w = jnp.ones(y.shape, f32) if mask is None else mask.reshape(-1).astype(f32)
    return _jitted(chunk)(h, kernel, y, w)


def chunk_of(name: str) -> int | None:
    """The chunk width of the loss's ``jit`` named ``name``; ``None`` for another name."""
    head, _, tail = name.rpartition("_c")
    return int(tail) if head == NAME and tail.isdigit() else None


def over_chunks(size: int, chunk: int, piece: Callable, carry):
    """``carry`` threaded through ``piece(start, length, carry)`` for the chunks of ``chunk``
    (at most ``size``) of ``range(size)``: the full ones in a ``fori_loop`` (one compiled body),
    then the narrower last one when ``chunk`` does not divide ``size``."""
    width = min(chunk, size)
    full, rest = divmod(size, width)
    carry = jax.lax.fori_loop(0, full, lambda i, c: piece(i * width, width, c), carry)
    return piece(full * width, rest, carry) if rest else carry


def forward(h, kernel, labels, chunk: int):
    """``(lse, picked)`` ``[N]``: each position's log-sum-exp over the vocabulary and its
    label's logit, in chunks (float32)."""
    n, v = h.shape[0], kernel.shape[1]

    def piece(start, length, carry):
        m, s, picked = carry
        logits = jnp.dot(h, jax.lax.dynamic_slice_in_dim(kernel, start, length, 1),
                         preferred_element_type=f32)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
        at = labels - start
        inside = (at >= 0) & (at < length)
        got = jnp.take_along_axis(logits, jnp.clip(at, 0, length - 1)[:, None], axis=-1)[:, 0]
        return m_new, s, jnp.where(inside, got, picked)

    # A label outside [0, V) picks no logit: NaN, so that its loss is NaN, not a quiet number.
    m, s, picked = over_chunks(v, chunk, piece, (jnp.full((n,), -jnp.inf, f32),
                                                 jnp.zeros((n,), f32),
                                                 jnp.full((n,), jnp.nan, f32)))
    return m + jnp.log(s), picked


def mean_loss(lse, picked, w):
    """The weighted mean of ``lse - picked`` (a position of weight 0 counts nothing, even with a
    label out of range)."""
    return jnp.sum(jnp.where(w != 0, (lse - picked) * w, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)


def backward(h, read, labels, w, lse, g, chunk: int, v: int, apply: Callable, acc):
    """The backward pass in chunks: ``(dh, acc)``. ``read(acc, start, length)`` gives the
    kernel's columns ``[H, length]``; ``apply(acc, start, g_c, dh)`` takes the head's gradient
    on those columns (``[H, length]``, after ``dh`` has read them) and returns the new ``acc``.
    ``dh`` ``[N, H]`` float32."""
    scale = (g * w / jnp.maximum(jnp.sum(w), 1.0)).astype(f32)

    def piece(start, length, carry):
        dh, acc = carry
        wc = read(acc, start, length)
        logits = jnp.dot(h, wc, preferred_element_type=f32)
        p = jnp.exp(logits - lse[:, None])
        onehot = (labels - start)[:, None] == jnp.arange(length)[None, :]
        d = (p - onehot.astype(f32)) * scale[:, None]
        dh = dh + jnp.dot(d, wc.T.astype(f32), preferred_element_type=f32)
        g_c = jnp.dot(h.T, d.astype(h.dtype), preferred_element_type=f32).astype(wc.dtype)
        return dh, apply(acc, start, g_c, dh)

    return over_chunks(v, chunk, piece, (jnp.zeros(h.shape, f32), acc))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss(h, kernel, labels, w, chunk):
    lse, picked = forward(h, kernel, labels, chunk)
    return mean_loss(lse, picked, w)


def _loss_fwd(h, kernel, labels, w, chunk):
    lse, picked = forward(h, kernel, labels, chunk)
    return mean_loss(lse, picked, w), (h, kernel, labels, w, lse)


def _loss_bwd(chunk, res, g):
    h, kernel, labels, w, lse = res
    read = lambda _, start, length: jax.lax.dynamic_slice_in_dim(kernel, start, length, 1)
    apply = lambda acc, start, g_c, dh: jax.lax.dynamic_update_slice_in_dim(acc, g_c, start, 1)
    dh, dk = backward(h, read, labels, w, lse, g, chunk, kernel.shape[1], apply,
                      jnp.zeros(kernel.shape, kernel.dtype))
    return dh.astype(h.dtype), dk, None, jnp.zeros_like(w)


_loss.defvjp(_loss_fwd, _loss_bwd)


@functools.lru_cache(maxsize=None)
def _jitted(chunk: int):
    """The loss with vocabulary chunks of ``chunk`` columns, jitted under the name
    ``f"{NAME}_c{chunk}"`` (how :mod:`jpeft.lomo` finds it and its chunk)."""
    def fn(h, kernel, labels, w):
        return _loss(h, kernel, labels, w, chunk)
    fn.__name__ = fn.__qualname__ = f"{NAME}_c{chunk}"
    return jax.jit(fn)


__all__ = ["NAME", "backward", "chunk_of", "forward", "lm_cross_entropy", "mean_loss",
           "over_chunks"]
