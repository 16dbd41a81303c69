"""The mixed-precision policy: float32 deltas on low-precision bases by default, the adapter path
computed in the delta's dtype, saved with the method and checked at load."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.core import precision


def test_delta_dtype_policy():
    assert precision.delta_dtype(jnp.bfloat16) == jnp.float32
    assert precision.delta_dtype(jnp.float16) == jnp.float32
    assert precision.delta_dtype(jnp.int8) == jnp.float32
    assert precision.delta_dtype(jnp.float32) == jnp.float32
    assert precision.delta_dtype(jnp.float64) == jnp.float64
    assert precision.delta_dtype(jnp.float32, "bfloat16") == jnp.bfloat16
    with pytest.raises(ValueError, match="floating dtype, got int8"):
        precision.delta_dtype(jnp.float32, jnp.int8)


def _mlp(v, x):
    """Two layers computing in the weights' dtype; the loss is taken in float32."""
    h = jnp.tanh(x.astype(v["w1"].dtype) @ v["w1"])
    return (h @ v["w2"]).astype(jnp.float32)


def _setup(dtype, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    v = {"w1": jax.random.normal(k[0], (16, 32)) / 4, "w2": jax.random.normal(k[1], (32, 8)) / 6}
    x = jax.random.normal(k[2], (64, 16))
    y = jnp.sin(x @ jax.random.normal(k[3], (16, 8)))
    return jax.tree.map(lambda a: a.astype(dtype), v), x, y


def _train(dtype, steps, lr, lora_dtype=None):
    v, x, y = _setup(dtype)
    sites = jpeft.probe(_mlp, v, x)
    method = jpeft.lora(("w1", "w2"), rank=4, alpha=8, dtype=lora_dtype)
    delta = method.init(jax.random.key(1), v, sites)
    f = jpeft.wrap(_mlp, method, sites)

    def loss(params, delta, batch, key):
        return jnp.mean((f(params, delta, batch[0]) - batch[1]) ** 2)
    opt = optax.adam(lr)
    step = jpeft.make_train_step(loss, opt)
    state = opt.init(delta)
    start, losses = jax.tree.map(np.array, delta), []          # the step donates the delta
    for i in range(steps):
        delta, state, m = step(v, delta, state, (x, y), jax.random.key(i))
        losses.append(float(m["loss"]))
    return start, delta, np.array(losses), method


def test_factors_default_to_float32_on_a_bf16_base_and_keep_small_updates():
    """Three Adam steps of 1e-4 change every entry of float32 factors; bf16 factors (asked for)
    round most of those updates away, which is why float32 is the default."""
    a0, a1, _, method = _train(jnp.bfloat16, 3, 1e-4)
    assert a0["w1"]["lora_A"].dtype == jnp.float32 and method.config["dtype"] is None
    changed = np.mean(np.asarray(a0["w1"]["lora_A"]) != np.asarray(a1["w1"]["lora_A"]))
    assert changed == 1.0
    b0, b1, _, method = _train(jnp.bfloat16, 3, 1e-4, lora_dtype="bfloat16")
    assert b0["w1"]["lora_A"].dtype == jnp.bfloat16 and method.config["dtype"] == "bfloat16"
    changed = np.mean(np.asarray(b0["w1"]["lora_A"], np.float32)
                      != np.asarray(b1["w1"]["lora_A"], np.float32))
    assert changed < 0.5


def test_a_bf16_base_run_tracks_the_float32_run():
    """LoRA on the same model stored in bf16 and in float32, 30 steps of Adam 1e-2: the loss
    curves agree within 3% at every step (measured: about 1%)."""
    *_, l32, _ = _train(jnp.float32, 30, 1e-2)
    *_, l16, _ = _train(jnp.bfloat16, 30, 1e-2)
    assert l32[-1] < 0.5 * l32[0]
    np.testing.assert_allclose(l16, l32, rtol=0.03)


def test_compute_dtype_is_the_factors_dtype_unless_given():
    """On a bf16 base the factored path runs in float32 (the factors' dtype: its two products
    take float32 operands) and is rounded to bf16 once, where it is added; with
    ``compute_dtype="bfloat16"`` its products run in bf16."""
    v, x, _ = _setup(jnp.bfloat16)
    xb = x.astype(jnp.bfloat16)
    sites = jpeft.probe(_mlp, v, x)
    model = lambda v, x: x.astype(jnp.bfloat16) @ v["w1"]
    for compute, f32_products in ((None, 2), ("bfloat16", 0)):
        method = jpeft.lora(("w1",), rank=4, alpha=8, compute_dtype=compute)
        d = jax.tree.map(lambda a: a + 0.1, method.init(jax.random.key(1), v, sites))
        f = jpeft.wrap(model, method, sites)
        dots = [e for e in jax.make_jaxpr(f)(v, d, x).jaxpr.eqns
                if e.primitive.name == "dot_general"]
        assert sum(all(i.aval.dtype == jnp.float32 for i in e.invars) for e in dots) == \
            f32_products
        assert method.config["compute_dtype"] == compute
        if compute is None:
            upd = 2.0 * (xb.astype(jnp.float32) @ d["w1"]["lora_A"]) @ d["w1"]["lora_B"]
            want = xb @ v["w1"] + upd.astype(jnp.bfloat16)
            np.testing.assert_allclose(np.asarray(f(v, d, x), np.float32),
                                       np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)


def test_checkpoints_load_across_the_policy(tmp_path):
    """A float32 delta saved on a float32 base loads on the bf16 base (the policy makes float32
    there too); bf16 factors from before the policy are widened losslessly; a delta that the
    method would narrow is an error naming both dtypes."""
    v32, x, _ = _setup(jnp.float32)
    v16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), v32)
    sites = jpeft.probe(_mlp, v32, x)
    method = jpeft.lora(("w1",), rank=2)
    delta = method.init(jax.random.key(0), v32, sites)
    jpeft.save(tmp_path / "a", method, delta)
    loaded = jpeft.load(tmp_path / "a", v16, jpeft.probe(_mlp, v16, x))
    jax.tree.map(np.testing.assert_array_equal, loaded.delta, delta)
    old = jax.tree.map(lambda a: a.astype(jnp.bfloat16), delta)        # an older bf16 save
    jpeft.save(tmp_path / "b", method, old)
    loaded = jpeft.load(tmp_path / "b", v16, jpeft.probe(_mlp, v16, x))
    assert loaded.delta["w1"]["lora_A"].dtype == jnp.float32
    np.testing.assert_array_equal(loaded.delta["w1"]["lora_A"],
                                  np.asarray(old["w1"]["lora_A"], np.float32))
    narrow = jpeft.lora(("w1",), rank=2, dtype="bfloat16")
    jpeft.save(tmp_path / "c", narrow, delta)                         # float32 arrays, bf16 config
    with pytest.raises(jpeft.checkpoint.CheckpointError,
                       match=r"w1/lora_A: stored float32, the method makes bfloat16"):
        jpeft.load(tmp_path / "c", v16, jpeft.probe(_mlp, v16, x))


def test_activation_methods_follow_the_policy_on_a_bf16_model():
    """IA3's vectors, adapters and the soft prompt are float32 on a bf16 model (the marks carry
    bf16 activations), and IA3's dtype setting is saved and rebuilt."""
    import zoo
    s = zoo.build("nnx_decoder")
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), s.params)
    sites = jpeft.probe(s.apply, p16, *s.args)
    for method in (jpeft.ia3(), jpeft.houlsby(reduction_factor=8), jpeft.prompt_tuning(4)):
        delta = method.init(jax.random.key(0), p16, sites)
        assert {x.dtype for x in jax.tree.leaves(delta)} == {jnp.dtype(jnp.float32)}, method.name
        out = jpeft.wrap(s.apply, method, sites)(p16, delta, *s.args)
        assert out.dtype == s.apply(p16, *s.args).dtype
    rebuilt = jpeft.methods.from_config(jpeft.ia3(dtype="bfloat16").config)
    assert {x.dtype for x in jax.tree.leaves(rebuilt.init(jax.random.key(0), p16, sites))} == \
        {jnp.dtype(jnp.bfloat16)}
