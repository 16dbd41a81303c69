import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.ops.flat_tokens import per_token


def _dense(x, w, b):
    return x @ w + b


def _norm(x, s, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / jnp.sqrt(v + 1e-6) * s + b


def _args(shape, fn, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], shape)
    f = shape[-1]
    if fn is _dense:
        return x, jax.random.normal(ks[1], (f, 5)) / f ** 0.5, jax.random.normal(ks[2], (5,))
    return x, 1 + 0.1 * jax.random.normal(ks[1], (f,)), jax.random.normal(ks[2], (f,))


@pytest.mark.parametrize("fn", [_dense, _norm])
@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 3, 4, 6), (6,)])
def test_values_and_gradients_equal_autodiff_of_the_layer(fn, shape):
    args = _args(shape, fn)
    flat = per_token(fn)
    np.testing.assert_array_equal(flat(*args), fn(*args))
    # An upstream weighting makes every token's cotangent different.
    cot = jax.random.normal(jax.random.key(9), fn(*args).shape)
    loss = lambda f: lambda *a: (jnp.tanh(f(*a)) * cot).sum()
    got = jax.jit(jax.grad(loss(flat), argnums=(0, 1, 2)))(*args)
    want = jax.grad(loss(fn), argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_under_vmap_and_remat():
    x, w, b = _args((4, 3, 6), _dense)
    flat = per_token(_dense)
    loss = lambda f: lambda x, w, b: jax.vmap(lambda xi: jax.checkpoint(f)(xi, w, b).sum())(x).sum()
    got = jax.grad(loss(flat), argnums=(1, 2))(x, w, b)
    want = jax.grad(loss(_dense), argnums=(1, 2))(x, w, b)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_their_dtypes():
    x, w, b = (a.astype(jnp.bfloat16) for a in _args((2, 3, 8), _dense))
    gx, gw, gb = jax.grad(lambda *a: per_token(_dense)(*a).astype(jnp.float32).sum(),
                          argnums=(0, 1, 2))(x, w, b)
    assert (gx.dtype, gw.dtype, gb.dtype) == (jnp.bfloat16,) * 3
    np.testing.assert_allclose(np.asarray(gb, np.float32), 6.0)   # 2 x 3 tokens, cotangent 1


def test_forward_mode_is_not_defined():
    x, w, b = _args((2, 3, 6), _dense)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(per_token(_dense), (x, w, b), (x, w, b))
