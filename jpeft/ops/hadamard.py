"""The fast Walsh-Hadamard transform as a product of small dense Hadamard blocks.

``H_n`` is the unnormalised Sylvester-Hadamard matrix of order ``n = 2^k`` (entries +-1)::

    H_1 = [1],    H_2n = [[H_n, H_n], [H_n, -H_n]] = H_2 (x) H_n,    H_n H_n = n I,   H_n = H_n^T

so ``H_n = H_s1 (x) H_s2 (x) ... (x) H_sf`` for any factorisation ``n = s1 * s2 * ... * sf`` into
powers of two. :func:`fwht` reshapes the vector into ``[s1, s2, ..., sf]`` and multiplies each axis
by its small block ``H_si`` (a matmul with a ``[si, si]`` constant, so XLA runs it on the matrix
units of a GPU or TPU): ``n * sum_i (2 si - 1)`` FLOPs, i.e. ``O(n log n)`` for bounded blocks
(``2 b / log2(b)`` times the ``n log2 n`` additions of the radix-2 butterfly, in exchange for
dense, well-shaped matmuls), and no ``n x n`` matrix is ever formed. Each pass writes one
``n``-length buffer; the previous one is dead after it.

Two exact shortcuts for zero-padded inputs and truncated outputs (used by the Fastfood projection
of :mod:`jpeft.methods.intrinsic`), both from the Kronecker structure ``H_n = H_{n/m} (x) H_m`` with
the first row and column of ``H_{n/m}`` all ones:

* :func:`fwht_padded`: ``H_n [x; 0] = tile(H_m x, n / m)`` for ``x`` of length ``m`` (``O(m log m + n)``);
* :func:`fwht_head`: ``(H_n x)[:m] = H_m sum_j x[j m:(j + 1) m]`` (``O(n + m log m)``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

#: Largest dense block of :func:`fwht` on GPU/TPU: a matrix-unit tile.
ACCELERATOR_MAX_BLOCK = 128
#: Largest dense block on CPU, where the transform is memory-bound: fewer FLOPs per pass win
#: (measured on MiniLM's Fastfood projections, 2 cores: 8 beats 16 and 128 by 20-40%).
CPU_MAX_BLOCK = 8


def default_max_block(backend: str | None = None) -> int:
    """``max_block`` for ``backend`` (default: ``jax.default_backend()``): 8 on CPU, 128 else."""
    backend = backend or jax.default_backend()
    return CPU_MAX_BLOCK if backend == "cpu" else ACCELERATOR_MAX_BLOCK


def is_power_of_two(n: int) -> bool:
    return isinstance(n, (int, np.integer)) and n >= 1 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
    """The smallest ``2^k >= n`` (``n >= 1``)."""
    if n < 1:
        raise ValueError(f"next_power_of_two: n must be >= 1, got {n}")
    return 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def hadamard_matrix(n: int, dtype=np.float32) -> np.ndarray:
    """The dense Sylvester-Hadamard matrix ``H_n`` (numpy, ``[n, n]``, entries +-1), for small ``n``:
    ``H[i, j] = (-1)^popcount(i & j)``."""
    if not is_power_of_two(n):
        raise ValueError(f"hadamard_matrix: n must be a power of two, got {n}")
    return _sylvester(int(n)).astype(dtype)


def block_sizes(n: int, max_block: int = ACCELERATOR_MAX_BLOCK) -> tuple[int, ...]:
    """Powers of two ``(s1, ..., sf)`` with product ``n``, each ``<= max_block``, as few and as even
    as possible (``2^24`` with ``max_block = 128``: ``(64, 64, 64, 64)``; ``n = 1``: ``()``)."""
    if not is_power_of_two(n):
        raise ValueError(f"block_sizes: n must be a power of two, got {n}")
    if not is_power_of_two(max_block) or max_block < 2:
        raise ValueError(f"block_sizes: max_block must be a power of two >= 2, got {max_block}")
    k, p = int(n).bit_length() - 1, int(max_block).bit_length() - 1
    if k == 0:
        return ()
    f = math.ceil(k / p)
    bits = [k // f + (1 if i < k % f else 0) for i in range(f)]
    return tuple(1 << b for b in bits)


def _as_float(x) -> jax.Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)


def fwht(x: jax.Array, *, max_block: int | None = None,
         precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST) -> jax.Array:
    """Unnormalised Walsh-Hadamard transform along the last axis: ``y = x @ H_n`` (``H_n`` symmetric).

    Args:
      x: ``[..., n]`` with ``n`` a power of two (``n = 1`` is the identity); integers become float32.
      max_block: largest dense Hadamard block (a power of two >= 2; ``None``:
        :func:`default_max_block`). The transform runs as
        ``len(block_sizes(n, max_block))`` matmuls ``[s, s] x [s, rest]``, each followed by a cyclic
        rotation of the axes (a reshape), so that the next block's axis comes first.
      precision: matmul precision. ``HIGHEST`` keeps float32 accuracy on GPU/TPU (whose default
        rounds inputs to TF32/bfloat16; the +-1 blocks themselves are exact in any format).

    Returns:
      ``[..., n]``, same dtype. ``fwht(fwht(x)) = n x``; divide by ``sqrt(n)`` for the orthonormal
      transform.
    """
    x = _as_float(x)
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"fwht: the last axis must have a power-of-two length, got {x.shape}")
    sizes = block_sizes(n, max_block or default_max_block())
    batch = x.shape[:-1]
    y = x.reshape((-1, n))
    for s in sizes:
        h = jnp.asarray(hadamard_matrix(s), dtype=y.dtype)
        # y[b, j * (n/s) + r] -> z[b, r * s + i] = sum_j H_s[i, j] y[b, j, r]: the top log2(s)
        # index bits are transformed and rotated to the bottom; after all blocks the order is back.
        y = jnp.einsum("ij,bjr->bri", h, y.reshape((-1, s, n // s)), precision=precision)
        y = y.reshape((-1, n))
    return y.reshape(batch + (n,))


def fwht_padded(x: jax.Array, n: int, **kwargs) -> jax.Array:
    """``H_n`` applied to ``x`` zero-padded to length ``n``, in ``O(m log m + n)``.

    Args:
      x: ``[..., m]`` with ``1 <= m <= n``.
      n: a power of two.
      **kwargs: passed to :func:`fwht`.

    With ``m' = next_power_of_two(m)``: ``H_n [x; 0] = tile(H_m' [x; 0], n / m')``, since
    ``H_n = H_{n/m'} (x) H_m'`` and only the first block of the padded input is non-zero.
    """
    x = _as_float(x)
    m = x.shape[-1]
    if not is_power_of_two(n) or not 1 <= m <= n:
        raise ValueError(f"fwht_padded: need 1 <= x.shape[-1] <= n with n a power of two, got "
                         f"{x.shape} and n = {n}")
    mp = next_power_of_two(m)
    if mp > m:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, mp - m)])
    y = fwht(x, **kwargs)
    return jnp.tile(y, (1,) * (x.ndim - 1) + (n // mp,))


def fwht_head(x: jax.Array, m: int, **kwargs) -> jax.Array:
    """The first ``m`` outputs of ``H_n x``, in ``O(n + m log m)``.

    Args:
      x: ``[..., n]``, ``n`` a power of two.
      m: ``1 <= m <= n``.
      **kwargs: passed to :func:`fwht`.

    With ``m' = next_power_of_two(m)``: ``(H_n x)[:m'] = H_m' sum_j x[j m' : (j + 1) m']`` (the rows
    of ``H_n`` with index ``< m'`` are ``[H_m', H_m', ..., H_m']``).
    """
    x = _as_float(x)
    n = x.shape[-1]
    if not is_power_of_two(n) or not 1 <= m <= n:
        raise ValueError(f"fwht_head: need 1 <= m <= x.shape[-1] (a power of two), got m = {m} "
                         f"and {x.shape}")
    mp = next_power_of_two(m)
    if mp < n:
        x = x.reshape(x.shape[:-1] + (n // mp, mp)).sum(axis=-2)
    return fwht(x, **kwargs)[..., :m]
