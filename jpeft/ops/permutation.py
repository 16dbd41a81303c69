"""Keyed pseudo-random permutations of ``[0, 2^k)`` computed element-wise (a Feistel network).

A uniformly random permutation of ``n`` entries (``jax.random.permutation``) is a sort of ``n``
random keys; regenerating one inside every training step costs a full sort (measured: 24 s for
``n = 2^24`` on a 2-core CPU), and storing it costs ``4 n`` bytes. A Feistel network gives a keyed
bijection of ``[0, 2^k)`` whose value *and inverse* at any index are a few dozen integer operations,
so ``perm = feistel_indices(keys, n)`` is ``O(n)`` element-wise work that XLA fuses into the gather,
nothing is stored, and the transpose (needed by the backward pass) is a gather with the inverse
permutation instead of a scatter.

Construction, for ``n = 2^k``: the index ``i`` is whitened ``i ^ w_in``, split into a high part ``L``
(``a = k // 2`` bits) and a low part ``R`` (``b = k - a`` bits), and each of the ``rounds`` rounds
maps ``(L, R) -> (R, L ^ (F(R, key_r) mod 2^|L|))`` (the part widths swap, an unbalanced Feistel
network when ``k`` is odd); finally ``^ w_out``. Each step is a bijection of ``[0, 2^k)``, hence so
is the whole. ``F(R, key) = fmix32((R * 0x9E3779B1) ^ key)`` (MurmurHash3's 32-bit finaliser).
With independent random round functions, 4 rounds already give a strong pseudo-random permutation
(Luby and Rackoff, 1988); the default uses 6. It is *not* a uniform draw from all ``n!``
permutations (no keyed family of that size is), but no statistic we test tells it from one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jpeft.ops import counter_random

DEFAULT_ROUNDS = 6
MAX_LOG2 = 30


def feistel_keys(key: jax.Array, rounds: int = DEFAULT_ROUNDS) -> jax.Array:
    """``uint32 [rounds + 2]``: the round keys, then the input and output whitening masks."""
    if rounds < 1:
        raise ValueError(f"feistel_keys: rounds must be >= 1, got {rounds}")
    return jax.random.bits(key, (rounds + 2,), jnp.uint32)


def _round_fn(r: jax.Array, key: jax.Array) -> jax.Array:
    return counter_random.fmix32((r * jnp.uint32(0x9E3779B1)) ^ key)


def _log2(n: int, what: str) -> int:
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"{what}: n must be a power of two, got {n}")
    k = n.bit_length() - 1
    if k > MAX_LOG2:
        raise ValueError(f"{what}: n = 2^{k} is larger than 2^{MAX_LOG2}")
    return k


def feistel_apply(i: jax.Array, keys: jax.Array, k: int, *, inverse: bool = False) -> jax.Array:
    """The permutation (or its inverse) of ``[0, 2^k)`` keyed by ``keys``, at the indices ``i``;
    ``uint32`` out.

    ``keys`` is ``[..., rounds + 2]`` (one permutation per leading index) and ``i`` broadcasts
    against ``keys.shape[:-1] + (1,)``: ``i = arange(n)`` with keys ``[b, rounds + 2]`` gives ``[b, n]``.
    """
    rounds = keys.shape[-1] - 2
    key = lambda r: keys[..., r, None]
    mask = lambda w: jnp.uint32((1 << w) - 1)
    s = jnp.asarray(i).astype(jnp.uint32)
    w_in, w_out = key(rounds) & mask(k), key(rounds + 1) & mask(k)
    widths = []                                  # (|L|, |R|) before each round
    a, b = k // 2, k - k // 2
    for _ in range(rounds):
        widths.append((a, b))
        a, b = b, a
    if not inverse:
        s = s ^ w_in
        for r, (a, b) in enumerate(widths):
            left, right = s >> b, s & mask(b)
            left = left ^ (_round_fn(right, key(r)) & mask(a))
            s = (right << a) | left              # new (L, R) = (R, L ^ F(R)), widths (b, a)
        return s ^ w_out
    s = s ^ w_out
    for r in reversed(range(rounds)):
        a, b = widths[r]
        right, left = s >> a, s & mask(a)
        left = left ^ (_round_fn(right, key(r)) & mask(a))
        s = (left << b) | right
    return s ^ w_in


def feistel_indices(keys: jax.Array, n: int, *, inverse: bool = False) -> jax.Array:
    """``int32 [..., n]``: ``perm[..., i]`` for ``i`` in ``[0, n)`` (``n`` a power of two), one
    permutation per leading index of ``keys`` (``[..., rounds + 2]``); with ``inverse`` the inverse
    permutations."""
    k = _log2(n, "feistel_indices")
    return feistel_apply(jnp.arange(n, dtype=jnp.uint32), keys, k,
                         inverse=inverse).astype(jnp.int32)


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    if idx.ndim == 1:
        return x[..., idx]
    return jnp.take_along_axis(x, jnp.broadcast_to(idx, x.shape), axis=-1)


@jax.custom_vjp
def permute(x: jax.Array, keys: jax.Array) -> jax.Array:
    """``y[..., i] = x[..., perm[i]]`` along the last axis (length a power of two), with
    ``perm = feistel_indices(keys, n)``; keys ``[rounds + 2]`` permute every row alike, keys
    ``[..., rounds + 2]`` (leading shape that of ``x``) each row with its own permutation.

    Linear in ``x``; its transpose (the backward pass) is the gather with the inverse permutation,
    computed from ``keys`` again (no scatter, no stored indices).
    """
    return _gather(x, feistel_indices(keys, x.shape[-1]))


def _permute_fwd(x, keys):
    return permute(x, keys), keys


def _permute_bwd(keys, g):
    return _gather(g, feistel_indices(keys, g.shape[-1], inverse=True)), None


permute.defvjp(_permute_fwd, _permute_bwd)
