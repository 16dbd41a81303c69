"""Counter-based random numbers: finite, right moments and tails, independent of the key."""

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.ops import counter_random as cr


def test_extreme_bits_stay_finite_and_in_range():
    bits = jnp.asarray([0, 1, 255, 256, 2 ** 31, 2 ** 32 - 257, 2 ** 32 - 1], jnp.uint32)
    z = np.asarray(cr.normal_from_bits(bits))
    u = np.asarray(cr.uniform_from_bits(bits))
    assert np.isfinite(z).all() and np.abs(z).max() < 5.5
    assert (u > 0).all() and (u < 1).all()
    np.testing.assert_allclose(z[0], -z[-1], rtol=1e-6)           # symmetric


def test_normal_moments_and_tails():
    n = 1 << 20
    z = np.asarray(cr.normal(cr.hash_keys(jax.random.key(0)), n), np.float64)
    se = 1 / np.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * np.sqrt(2) * se
    assert abs(((z - z.mean()) ** 4).mean() / z.var() ** 2 - 3) < 5 * np.sqrt(24) * se
    for t, p in ((1.0, 0.3173105), (2.0, 0.0455003), (3.0, 0.0026998)):     # P(|Z| > t)
        assert abs((np.abs(z) > t).mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 * se                  # serial correlation


def test_keys_give_independent_streams_and_signs_are_balanced():
    k = jax.vmap(cr.hash_keys)(jax.random.split(jax.random.key(1), 2))
    a, b = np.asarray(cr.normal(k, 1 << 16), np.float64)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / 2 ** 8
    s = np.asarray(cr.rademacher(k[0], 1 << 16))
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 5 / 2 ** 8
    u = np.asarray(cr.uniform(k[0], 1 << 16))
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12) / 2 ** 8
