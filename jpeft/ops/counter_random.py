"""Counter-based random numbers from a 32-bit hash: ``value[i] = f(hash(i, key))``, element-wise.

``jax.random`` (threefry-2x32, 20 rounds per pair of words) is the right default, but inside a
training step that regenerates tens of millions of fixed random numbers every pass (the Fastfood
factors of :mod:`jpeft.methods.intrinsic`), its bits dominate the step on a CPU: 18 ns per normal
against 4 ns here (measured on 12.6M entries, 2 cores). A counter-based hash needs no state and no
storage, and XLA fuses it into the consumer.

``hash32(i, key) = fmix32(fmix32((i * 0x9E3779B1) ^ key0) + key1)``, with ``fmix32`` the 32-bit
finaliser of MurmurHash3 (a bijection of ``uint32`` with full avalanche). For a fixed key,
``i -> hash32(i, key)`` is a bijection of ``uint32``, so ``2^k`` consecutive counters give ``2^k``
distinct values. Not cryptographic; its statistics (moments, tail frequencies, serial correlation)
are tested. Keys come from ``jax.random.bits``, so everything stays a function of a JAX key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fmix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser on ``uint32`` (a bijection)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_keys(key: jax.Array) -> jax.Array:
    """``uint32 [2]`` hash key from a JAX key."""
    return jax.random.bits(key, (2,), jnp.uint32)


def hash32(i: jax.Array, keys: jax.Array) -> jax.Array:
    """``uint32`` hash of the counters ``i`` under ``keys`` (``[..., 2]``; ``i`` broadcasts against
    ``keys.shape[:-1] + (1,)``)."""
    i = jnp.asarray(i).astype(jnp.uint32)
    k0, k1 = keys[..., 0, None], keys[..., 1, None]
    return fmix32(fmix32((i * jnp.uint32(0x9E3779B1)) ^ k0) + k1)


def uniform_from_bits(bits: jax.Array) -> jax.Array:
    """float32 in the open interval ``(0, 1)`` from ``uint32`` bits: ``(top 23 bits + 1/2) / 2^23``
    (every value, ``2^-24`` to ``1 - 2^-24``, is exact in float32)."""
    return ((bits >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))


def normal_from_bits(bits: jax.Array) -> jax.Array:
    """float32 standard normals from ``uint32`` bits by inversion, ``sqrt(2) erfinv(v)``, with
    ``v = (2 (top 24 bits) + 1 - 2^24) / 2^24`` in ``[-1 + 2^-24, 1 - 2^-24]``, computed exactly (so
    never +-1, whose ``erfinv`` is infinite); tails reach about 5.4 standard deviations."""
    top = (bits >> 8).astype(jnp.int32)
    v = (2 * top + 1 - (1 << 24)).astype(jnp.float32) * (1.0 / (1 << 24))
    return jnp.float32(1.4142135623730951) * jax.lax.erf_inv(v)


def uniform(keys: jax.Array, n: int) -> jax.Array:
    """float32 ``[..., n]`` in ``(0, 1)`` (:func:`uniform_from_bits` of the hashed counters)."""
    return uniform_from_bits(hash32(jnp.arange(n, dtype=jnp.uint32), keys))


def normal(keys: jax.Array, n: int) -> jax.Array:
    """float32 ``[..., n]`` standard normals (:func:`normal_from_bits` of the hashed counters)."""
    return normal_from_bits(hash32(jnp.arange(n, dtype=jnp.uint32), keys))


def rademacher(keys: jax.Array, n: int) -> jax.Array:
    """float32 ``[..., n]`` of +-1 with equal probability (the top bit of the hash)."""
    bits = hash32(jnp.arange(n, dtype=jnp.uint32), keys)
    return jnp.where(bits >> 31 == 0, 1.0, -1.0).astype(jnp.float32)
