"""The fast Walsh-Hadamard transform against a dense Sylvester matrix built here from its definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.ops import hadamard


def _dense(n: int) -> np.ndarray:
    """Independent reference: ``H[i, j] = (-1)^popcount(i & j)`` (the Sylvester-Hadamard matrix)."""
    i = np.arange(n)
    bits = np.bitwise_and(i[:, None], i[None, :])
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return np.where(parity == 1, -1.0, 1.0)


@pytest.mark.parametrize("max_block", [2, 8, 128])
def test_fwht_equals_dense_hadamard_for_every_size_up_to_1024(max_block):
    rng = np.random.default_rng(max_block)
    f = jax.jit(lambda x: hadamard.fwht(x, max_block=max_block))
    for k in range(11):
        n = 1 << k
        x = rng.normal(size=(3, n)).astype(np.float32)
        want = x.astype(np.float64) @ _dense(n)
        np.testing.assert_allclose(f(x), want, rtol=1e-5, atol=1e-4 * np.sqrt(n))


def test_sylvester_matrix_and_block_sizes():
    for n in (1, 2, 4, 64):
        np.testing.assert_array_equal(hadamard.hadamard_matrix(n), _dense(n))
    assert hadamard.block_sizes(1, 8) == ()
    assert hadamard.block_sizes(2 ** 24, 128) == (64, 64, 64, 64)
    for k in range(26):
        for b in (2, 8, 16, 128):
            sizes = hadamard.block_sizes(1 << k, b)
            assert int(np.prod(sizes, dtype=np.int64)) == 1 << k
            assert all(s <= b for s in sizes) and max(sizes, default=1) <= 2 * min(sizes, default=1)


def test_involution_and_gradient_is_the_transform():
    x = jax.random.normal(jax.random.key(0), (2 ** 16,))
    y = jax.jit(hadamard.fwht)(x)
    np.testing.assert_allclose(hadamard.fwht(y), 2 ** 16 * x, rtol=0, atol=1e-5 * 2 ** 16 * 8)
    w = jax.random.normal(jax.random.key(1), (512,))
    g = jax.grad(lambda v: jnp.vdot(hadamard.fwht(v), w))(jnp.zeros(512))
    np.testing.assert_allclose(g, _dense(512) @ np.asarray(w, np.float64), rtol=1e-5, atol=1e-4)


def test_large_transform_of_a_unit_vector_is_a_row_of_h():
    """n = 2^25 (beyond MiniLM's 2^24): fwht(e_j)[i] = (-1)^popcount(i & j), exactly."""
    n, j = 1 << 25, 0b1011001110001
    y = np.asarray(jax.jit(hadamard.fwht)(jnp.zeros(n).at[j].set(1.0)))
    i = np.arange(n, dtype=np.uint32)
    parity = np.zeros(n, np.uint32)
    for b in range(j.bit_length()):
        if j >> b & 1:
            parity ^= (i >> b) & 1
    np.testing.assert_array_equal(y, 1.0 - 2.0 * parity.astype(np.float32))


@pytest.mark.parametrize("m,n", [(1, 1), (1, 8), (3, 8), (5, 64), (64, 64), (100, 1024)])
def test_padded_and_head_shortcuts(m, n):
    rng = np.random.default_rng(m * n)
    h = _dense(n)
    x = rng.normal(size=(2, m)).astype(np.float32)
    padded = np.zeros((2, n))
    padded[:, :m] = x
    np.testing.assert_allclose(hadamard.fwht_padded(x, n, max_block=8), padded @ h,
                               rtol=1e-5, atol=1e-4)
    z = rng.normal(size=(2, n)).astype(np.float32)
    np.testing.assert_allclose(hadamard.fwht_head(z, m, max_block=8), (z @ h)[:, :m],
                               rtol=1e-5, atol=1e-4)


def test_bad_sizes_are_errors():
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard.fwht(jnp.ones(12))
    with pytest.raises(ValueError, match="max_block"):
        hadamard.block_sizes(16, 3)
    with pytest.raises(ValueError, match="fwht_head"):
        hadamard.fwht_head(jnp.ones(8), 9)
    with pytest.raises(ValueError, match="fwht_padded"):
        hadamard.fwht_padded(jnp.ones(9), 8)
