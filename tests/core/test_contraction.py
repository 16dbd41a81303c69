"""Contractions computed as flattened matrix products: the same numbers as ``einsum``, and
gradients that are plain matrix products (one contracted axis) whatever the token axes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.core import contraction


def _normal(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


@pytest.mark.parametrize("x_spec,w_spec,out_spec,x_shape,w_shape", [
    ("bti", "io", "bto", (2, 3, 5), (5, 4)),                 # Dense on [B, T, H]
    ("bti", "ihd", "bthd", (2, 3, 5), (5, 2, 3)),            # DenseGeneral query kernel
    ("btnd", "ndo", "bto", (2, 3, 2, 4), (2, 4, 5)),         # output projection, 2 contracted
    ("btnm", "nmo", "tbno", (2, 3, 2, 4), (2, 4, 5)),        # batch axis n, permuted output
    ("ibt", "oi", "obt", (5, 2, 3), (4, 5)),                 # weight first, x axes reordered
    ("bti", "i", "bt", (2, 3, 5), (5,)),                     # no free weight axis
])
def test_matmul_equals_einsum(x_spec, w_spec, out_spec, x_shape, w_shape):
    x, w = _normal(0, x_shape, w_shape)
    got = contraction.matmul(x, x_spec, w, w_spec, out_spec)
    want = jnp.einsum(f"{x_spec},{w_spec}->{out_spec}", x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # reverse and forward mode alike (a tall weight goes through an optimization barrier)
    g = _normal(1, want.shape)[0]
    vjp = lambda f: jax.vjp(f, x, w)[1](g)
    for a, b in zip(vjp(lambda x, w: contraction.matmul(x, x_spec, w, w_spec, out_spec)),
                    vjp(lambda x, w: jnp.einsum(f"{x_spec},{w_spec}->{out_spec}", x, w))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    tx, tw = _normal(2, x_shape, w_shape)
    jvp = lambda f: jax.jvp(f, (x, w), (tx, tw))[1]
    np.testing.assert_allclose(
        jvp(lambda x, w: contraction.matmul(x, x_spec, w, w_spec, out_spec)),
        jvp(lambda x, w: jnp.einsum(f"{x_spec},{w_spec}->{out_spec}", x, w)), rtol=1e-5, atol=1e-5)


def _compiled_dot_shapes(f, *args) -> list[tuple[int, ...]]:
    """Output shapes of the ``dot`` instructions in ``f``'s optimised HLO."""
    text = jax.jit(f).lower(*args).compile().as_text()
    return [tuple(int(d) for d in m.group(1).split(",") if d)
            for m in re.finditer(r"= f32\[([\d,]*)\]\S* dot\(", text)]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="reads XLA:CPU's dot instructions")
def test_tall_weight_gradient_is_computed_wide():
    """The gradient of a tall operand (LoRA's ``A [in, r]``) comes out of a ``[r, in]`` product
    (``dy^T x``, then a transpose): XLA otherwise folds the transpose into the product and
    computes ``x^T dy [in, r]``, 2-5x slower on CPU (``benchmarks/matmul_cost.py``)."""
    x, a = _normal(3, (2, 16, 48), (48, 4))
    loss = lambda a: jnp.sum(jnp.sin(contraction.matmul(x, "bti", a, "ir", "btr")))
    shapes = _compiled_dot_shapes(jax.grad(loss), a)
    assert (4, 48) in shapes and (48, 4) not in shapes, shapes
    np.testing.assert_allclose(
        jax.grad(loss)(a), jax.grad(lambda a: jnp.sum(jnp.sin(jnp.einsum("bti,ir->btr", x, a))))(a),
        rtol=1e-5, atol=1e-5)


def test_matmul_refuses_what_is_not_a_matrix_product():
    x, w = _normal(0, (2, 3), (3, 4))
    with pytest.raises(ValueError, match="is not a matrix product"):
        contraction.matmul(x, "ab", w, "bc", "c")            # x's own axis summed away


def test_dense_equals_matmul_on_any_leading_axes():
    x, w = _normal(1, (2, 3, 4, 5), (5, 2, 3))
    np.testing.assert_allclose(contraction.dense(x, w), jnp.einsum("abci,ihd->abchd", x, w),
                               rtol=1e-5, atol=1e-5)


def _dots(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dots(inner)


def test_lora_gradient_is_matrix_products_over_flattened_tokens():
    """Differentiating the factored LoRA term of a Dense on ``[B, T, H]`` gives only products
    with one contracted axis: no contraction over the batch and token axes together (XLA:CPU
    transposes the cotangent for those, see ``jpeft.core.contraction``)."""
    import flax.linen as nn
    model = nn.Dense(6)
    x = _normal(2, (2, 3, 4))[0]
    params = model.init(jax.random.key(0), x)
    sites = jpeft.probe(model.apply, params, x)
    method = jpeft.lora(("kernel",), rank=2, alpha=2.0)
    delta = method.init(jax.random.key(1), params, sites)
    f = jpeft.wrap(model.apply, method, sites)
    loss = lambda d: jnp.sum(jnp.sin(f(params, d, x)))
    dots = list(_dots(jax.make_jaxpr(jax.grad(loss))(delta).jaxpr))
    assert len(dots) >= 4
    for eqn in dots:
        (lc, rc), _ = eqn.params["dimension_numbers"]
        assert len(lc) == len(rc) == 1, eqn
    # ... and they are LoRA's gradient all the same
    s = 1.0
    a, b = delta["params"]["kernel"]["lora_A"], delta["params"]["kernel"]["lora_B"]
    ref = lambda a, b: jnp.sum(jnp.sin(model.apply(
        {"params": {**params["params"], "kernel": params["params"]["kernel"] + s * a @ b}}, x)))
    ga, gb = jax.grad(ref, argnums=(0, 1))(a, b)
    got = jax.grad(loss)(delta)["params"]["kernel"]
    np.testing.assert_allclose(got["lora_A"], ga, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["lora_B"], gb, rtol=1e-5, atol=1e-6)
