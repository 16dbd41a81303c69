"""The hard-concrete gate (Louizos, Welling and Kingma, 2018, arXiv 1712.01312), as used by diff
pruning (Guo et al., 2021, arXiv 2012.07463).

A gate ``z in [0, 1]`` with log-odds parameter ``alpha`` (any shape), stretched to ``(l, r)`` with
``l < 0 < 1 < r`` and clipped back to ``[0, 1]``, so that exact zeros (and ones) have non-zero
probability while ``z`` stays differentiable in ``alpha`` almost everywhere::

    u ~ U(0, 1)
    s = sigmoid(log u - log(1 - u) + alpha)        # binary concrete, temperature 1 (Guo et al.)
    s_bar = s * (r - l) + l
    z = clip(s_bar, 0, 1)

    P(z != 0) = P(s_bar > 0) = sigmoid(alpha - log(-l / r))         # the expected L0 per gate

The deterministic gate used at evaluation (Louizos et al., eq. 13) replaces the noise by its
median: ``z_hat = clip(sigmoid(alpha) * (r - l) + l, 0, 1)``.

Every function is elementwise over ``alpha`` and returns ``float32`` (or ``alpha``'s floating
dtype); none of them allocates more than one array of ``alpha``'s shape.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

#: Guo et al.'s stretch interval (their code: ``concrete_lower = -1.5``, ``concrete_upper = 1.5``).
LOWER, UPPER = -1.5, 1.5

#: How far ``u`` stays away from 0 and 1, so that ``log u`` and ``log(1 - u)`` are finite.
EPS = 1e-6


def _check_stretch(l: float, r: float) -> None:
    if not (l < 0.0 and r > 1.0):
        raise ValueError(f"hard concrete: the stretch interval needs l < 0 and r > 1, got "
                         f"l={l}, r={r}")


def _float(alpha: jax.Array) -> jax.Array:
    alpha = jnp.asarray(alpha)
    return alpha if jnp.issubdtype(alpha.dtype, jnp.floating) else alpha.astype(jnp.float32)


def sample(key: jax.Array, alpha: jax.Array, l: float = LOWER, r: float = UPPER) -> jax.Array:
    """A sampled gate ``z = clip(sigmoid(logit(u) + alpha) * (r - l) + l, 0, 1)``.

    Args:
      key: PRNG key; one ``u ~ U(EPS, 1 - EPS)`` is drawn per entry of ``alpha``.
      alpha: log-odds ``[...]``.
      l, r: stretch interval, ``l < 0``, ``r > 1``.

    Returns:
      ``z``, shape and floating dtype of ``alpha``, in ``[0, 1]``; differentiable in ``alpha``
      (gradient ``(r - l) s (1 - s)`` where ``0 < s_bar < 1``, zero where the clip is active).
    """
    _check_stretch(l, r)
    alpha = _float(alpha)
    u = jax.random.uniform(key, alpha.shape, jnp.float32, EPS, 1.0 - EPS)
    s = jax.nn.sigmoid(jnp.log(u) - jnp.log1p(-u) + alpha.astype(jnp.float32))
    return jnp.clip(s * (r - l) + l, 0.0, 1.0).astype(alpha.dtype)


def deterministic(alpha: jax.Array, l: float = LOWER, r: float = UPPER) -> jax.Array:
    """The evaluation gate ``z_hat = clip(sigmoid(alpha) * (r - l) + l, 0, 1)`` (shape of ``alpha``)."""
    _check_stretch(l, r)
    alpha = _float(alpha)
    s = jax.nn.sigmoid(alpha.astype(jnp.float32))
    return jnp.clip(s * (r - l) + l, 0.0, 1.0).astype(alpha.dtype)


def prob_nonzero(alpha: jax.Array, l: float = LOWER, r: float = UPPER) -> jax.Array:
    """``P(z != 0) = sigmoid(alpha - log(-l / r))`` per gate (shape of ``alpha``): the expected L0
    of one gate. Summed over gates, this is the penalty of diff pruning."""
    _check_stretch(l, r)
    alpha = _float(alpha)
    return jax.nn.sigmoid(alpha.astype(jnp.float32) - math.log(-l / r)).astype(alpha.dtype)


def expected_l0(alpha: jax.Array, l: float = LOWER, r: float = UPPER) -> jax.Array:
    """``sum_i sigmoid(alpha_i - log(-l / r))``: expected number of non-zero gates, a scalar
    (float32)."""
    return jnp.sum(prob_nonzero(alpha, l, r).astype(jnp.float32))
