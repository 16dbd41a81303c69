"""Hard-concrete gates against the formulas, computed independently in numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.ops import hard_concrete as hc


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


ALPHAS = np.array([-60.0, -5.0, -1.0, -0.3, 0.0, 0.2, 1.0, 3.0, 5.0, 60.0], np.float32)


@pytest.mark.parametrize("l, r", [(-1.5, 1.5), (-0.1, 1.1)])
def test_sampled_gates_follow_the_formula_and_lie_in_unit_interval(l, r):
    alpha = jnp.asarray(np.tile(ALPHAS, (500, 1)))
    key = jax.random.key(3)
    z = np.asarray(hc.sample(key, alpha, l, r))
    assert z.shape == alpha.shape and z.dtype == np.float32
    assert z.min() >= 0.0 and z.max() <= 1.0
    assert (z == 0.0).any() and (z == 1.0).any() and ((z > 0) & (z < 1)).any()
    # Same uniform draw, formula in float64 numpy.
    u = np.asarray(jax.random.uniform(key, alpha.shape, jnp.float32, hc.EPS, 1 - hc.EPS), np.float64)
    s = _sigmoid(np.log(u) - np.log1p(-u) + np.asarray(alpha, np.float64))
    np.testing.assert_allclose(z, np.clip(s * (r - l) + l, 0, 1), atol=2e-6)
    # Extreme logits give hard gates.
    assert np.all(z[:, 0] == 0.0) and np.all(z[:, -1] == 1.0)


@pytest.mark.parametrize("l, r", [(-1.5, 1.5), (-0.1, 1.1)])
def test_deterministic_gate_and_expected_l0_match_numpy(l, r):
    z = np.asarray(hc.deterministic(ALPHAS, l, r))
    np.testing.assert_allclose(z, np.clip(_sigmoid(ALPHAS) * (r - l) + l, 0, 1), atol=1e-6)
    assert z.min() >= 0 and z.max() <= 1 and z[0] == 0 and z[-1] == 1
    p = _sigmoid(ALPHAS.astype(np.float64) - math.log(-l / r))
    np.testing.assert_allclose(hc.prob_nonzero(ALPHAS, l, r), p, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(float(hc.expected_l0(ALPHAS.reshape(2, 5), l, r)), p.sum(), rtol=1e-6)


def test_probability_of_a_nonzero_gate_is_the_expected_l0():
    # Monte Carlo: the fraction of non-zero samples estimates P(z != 0) = sigmoid(alpha - log(-l/r)).
    l, r = -0.1, 1.1
    alpha = jnp.asarray([-2.0, 0.0, 1.5], jnp.float32)
    z = np.asarray(hc.sample(jax.random.key(0), jnp.broadcast_to(alpha, (40000, 3)), l, r))
    p = _sigmoid(np.asarray(alpha, np.float64) - math.log(-l / r))
    se = np.sqrt(p * (1 - p) / 40000)
    assert np.all(np.abs((z > 0).mean(0) - p) < 5 * se), ((z > 0).mean(0), p)


def test_gradient_through_the_clip():
    l, r = -1.5, 1.5
    alpha = jnp.asarray(np.linspace(-4, 4, 41), jnp.float32)
    key = jax.random.key(5)
    g = np.asarray(jax.grad(lambda a: jnp.sum(hc.sample(key, a, l, r)))(alpha))
    u = np.asarray(jax.random.uniform(key, alpha.shape, jnp.float32, hc.EPS, 1 - hc.EPS), np.float64)
    s = _sigmoid(np.log(u) - np.log1p(-u) + np.asarray(alpha, np.float64))
    sbar = s * (r - l) + l
    want = np.where((sbar > 0) & (sbar < 1), (r - l) * s * (1 - s), 0.0)
    np.testing.assert_allclose(g, want, atol=1e-5)


def test_bad_stretch_is_an_error():
    with pytest.raises(ValueError, match="l < 0 and r > 1"):
        hc.deterministic(jnp.zeros(3), l=0.1, r=1.5)
    with pytest.raises(ValueError, match="l < 0 and r > 1"):
        hc.sample(jax.random.key(0), jnp.zeros(3), l=-0.1, r=0.9)
