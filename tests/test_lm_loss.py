"""jpeft.lm_cross_entropy: the LM head's cross-entropy in vocabulary chunks.

Against the plain ``log_softmax`` cross-entropy of ``hidden @ kernel`` written in jnp (value and
gradients), and XLA's memory figures: no ``[N, V]`` buffer in the compiled gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft


def reference(hidden, kernel, labels, mask=None):
    logp = jax.nn.log_softmax(jnp.einsum("...h,hv->...v", hidden.astype(jnp.float32),
                                         kernel.astype(jnp.float32)))
    nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
    mask = jnp.ones(labels.shape) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def data(key=0, lead=(2, 7), h=16, v=37, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(key), 4)
    return (jax.random.normal(k[0], (*lead, h), dtype),
            (jax.random.normal(k[1], (h, v)) * 0.5).astype(dtype),
            jax.random.randint(k[2], lead, 0, v),
            (jax.random.uniform(k[3], lead) > 0.3).astype(jnp.float32))


@pytest.mark.parametrize("chunk", [5, 8, 37, 100])
@pytest.mark.parametrize("masked", [False, True])
def test_value_and_gradients_equal_the_plain_loss(chunk, masked):
    """Chunks that divide the vocabulary (37) or not, one chunk wider than it; with a mask."""
    hidden, kernel, labels, mask = data()
    mask = mask if masked else None
    got = jpeft.lm_cross_entropy(hidden, kernel, labels, mask, chunk=chunk)
    np.testing.assert_allclose(got, reference(hidden, kernel, labels, mask), rtol=1e-6)
    g = jax.grad(lambda a, b: jpeft.lm_cross_entropy(a, b, labels, mask, chunk=chunk),
                 (0, 1))(hidden, kernel)
    want = jax.grad(lambda a, b: reference(a, b, labels, mask), (0, 1))(hidden, kernel)
    for a, b in zip(g, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_and_other_leading_axes():
    """bfloat16 hidden states and head (products accumulate in float32; gradients come back in
    the inputs' dtypes); one leading axis or three; an all-zero mask gives 0, not NaN."""
    hidden, kernel, labels, _ = data(1, lead=(3, 2, 5), dtype=jnp.bfloat16)
    got = jpeft.lm_cross_entropy(hidden, kernel, labels, chunk=8)
    np.testing.assert_allclose(got, reference(hidden, kernel, labels), rtol=1e-5)
    gh, gk = jax.grad(lambda a, b: jpeft.lm_cross_entropy(a, b, labels, chunk=8),
                      (0, 1))(hidden, kernel)
    assert gh.dtype == gk.dtype == jnp.bfloat16
    h1, k1, y1, _ = data(2, lead=(9,))
    np.testing.assert_allclose(jpeft.lm_cross_entropy(h1, k1, y1, chunk=4),
                               reference(h1, k1, y1), rtol=1e-6)
    assert float(jpeft.lm_cross_entropy(h1, k1, y1, jnp.zeros((9,)), chunk=4)) == 0.0


def test_refusals():
    hidden, kernel, labels, mask = data()
    with pytest.raises(ValueError, match=r"kernel must be \[H, V\]"):
        jpeft.lm_cross_entropy(hidden, kernel.T, labels)
    with pytest.raises(ValueError, match="labels"):
        jpeft.lm_cross_entropy(hidden, kernel, labels[:, :3])
    with pytest.raises(ValueError, match="mask"):
        jpeft.lm_cross_entropy(hidden, kernel, labels, mask[:1])
    with pytest.raises(ValueError, match="chunk"):
        jpeft.lm_cross_entropy(hidden, kernel, labels, chunk=0)


def test_the_gradient_holds_no_logits_sized_buffer():
    """``jax.grad`` of the loss with 256 positions and a vocabulary of 4,096 (logits: 4 MiB):
    the compiled gradient's temporaries stay under a quarter of the logits (the head's gradient,
    2 MiB, is an output); the plain loss's hold at least the logits (the check sees them)."""
    hidden, kernel, labels, _ = data(3, lead=(256,), h=128, v=4096)
    logits = 256 * 4096 * 4
    temp = {}
    for name, loss in (("chunked", lambda a, b: jpeft.lm_cross_entropy(a, b, labels,
                                                                        chunk=512)),
                       ("plain", lambda a, b: reference(a, b, labels))):
        grad = jax.jit(jax.grad(loss, (0, 1)))
        temp[name] = grad.lower(hidden, kernel).compile().memory_analysis().temp_size_in_bytes
    assert temp["chunked"] < logits // 4 < logits <= temp["plain"], (temp, logits)


def test_a_label_out_of_range_is_nan_unless_masked():
    """A label past the vocabulary (or Hugging Face's -100) makes the loss NaN, not a number
    computed from no logit; with its position masked out it counts nothing."""
    hidden, kernel, labels, _ = data(4, lead=(6,))
    bad = labels.at[2].set(-100)
    assert np.isnan(float(jpeft.lm_cross_entropy(hidden, kernel, bad, chunk=8)))
    assert np.isnan(float(jpeft.lm_cross_entropy(hidden, kernel, labels.at[0].set(37), chunk=8)))
    mask = bad != -100
    got = jpeft.lm_cross_entropy(hidden, kernel, bad, mask, chunk=8)
    np.testing.assert_allclose(got, reference(hidden, kernel, labels, mask), rtol=1e-6)
    g = jax.grad(lambda a: jpeft.lm_cross_entropy(a, kernel, bad, mask, chunk=8))(hidden)
    want = jax.grad(lambda a: reference(a, kernel, labels, mask))(hidden)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
