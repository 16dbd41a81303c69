"""Feistel permutations: bijective, invertible, transposed correctly, and random-looking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.ops import permutation


def test_bijection_and_inverse():
    for k in (0, 1, 2, 3, 4, 7, 10, 13):
        n = 1 << k
        keys = permutation.feistel_keys(jax.random.key(k))
        p, q = jax.jit(lambda kk, n=n: (permutation.feistel_indices(kk, n),
                                        permutation.feistel_indices(kk, n, inverse=True)))(keys)
        p, q = np.asarray(p), np.asarray(q)
        np.testing.assert_array_equal(np.sort(p), np.arange(n))
        np.testing.assert_array_equal(q[p], np.arange(n))


def test_batched_keys_permute_each_row_with_its_own_permutation():
    keys = jax.vmap(permutation.feistel_keys)(jax.random.split(jax.random.key(0), 3))
    x = jnp.arange(3 * 64, dtype=jnp.float32).reshape(3, 64)
    y = np.asarray(permutation.permute(x, keys))
    for r in range(3):
        p = np.asarray(permutation.feistel_indices(keys[r], 64))
        np.testing.assert_array_equal(y[r], np.asarray(x)[r, p])
    assert not np.array_equal(y[0] - 0, y[1] - 64)


def test_gradient_is_the_transpose():
    keys = permutation.feistel_keys(jax.random.key(3))
    w = jax.random.normal(jax.random.key(4), (256,))
    g = jax.grad(lambda x: jnp.vdot(permutation.permute(x, keys), w))(jnp.zeros(256))
    p = np.asarray(permutation.feistel_indices(keys, 256))
    want = np.zeros(256, np.float32)
    want[p] = np.asarray(w)                       # scatter: the transpose of the gather
    np.testing.assert_array_equal(g, want)


def test_statistics_look_like_a_random_permutation():
    n = 1 << 12
    keys = jax.vmap(permutation.feistel_keys)(jax.random.split(jax.random.key(5), 300))
    p = np.asarray(permutation.feistel_indices(keys, n))                    # [300, n]
    i = np.arange(n)
    # Rank correlation of i and p[i]: about N(0, 1/n) per permutation.
    corr = np.array([np.corrcoef(i, row)[0, 1] for row in p])
    assert np.abs(corr).max() < 5 / np.sqrt(n)
    # Fixed points: Poisson(1) for a uniform permutation; mean over 300 permutations.
    fixed = (p == i).sum(1)
    assert abs(fixed.mean() - 1.0) < 5 * np.sqrt(1.0 / 300)
    # Where index 0 goes: uniform over 16 bins (chi-square with 15 dof; 99.99% quantile ~ 44).
    counts = np.bincount(p[:, 0] * 16 // n, minlength=16)
    assert ((counts - 300 / 16) ** 2 / (300 / 16)).sum() < 44
    # Neighbours stay no closer than chance: mean |p[i+1] - p[i]| of a uniform permutation is n/3.
    gap = np.abs(np.diff(p, axis=1)).mean()
    assert abs(gap / n - 1 / 3) < 0.01


def test_bad_sizes():
    keys = permutation.feistel_keys(jax.random.key(0))
    with pytest.raises(ValueError, match="power of two"):
        permutation.feistel_indices(keys, 12)
    with pytest.raises(ValueError, match="rounds"):
        permutation.feistel_keys(jax.random.key(0), 0)
