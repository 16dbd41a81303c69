"""UniPELT: gated LoRA + gated prefix + gated adapter; NoGate; gate values per layer and example."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import zoo
from conftest import perturb
from jpeft.core import paths as paths_lib
from jpeft.methods import lora as lora_lib
from jpeft.methods import unipelt as unipelt_lib


@pytest.fixture(scope="module")
def bert():
    s = zoo.build("linen_bert")
    return s, jpeft.probe(s.apply, s.params, *s.args)


def _set_gate_bias(delta, value):
    """Every gate bias set to ``value`` (+30: gates 1, -30: gates 0)."""
    def one(kp, x):
        name = paths_lib.to_path(kp)[-1]
        return jnp.full_like(x, value) if name.endswith("gate_bias") else x
    return jax.tree_util.tree_map_with_path(one, delta)


def test_gates_open_equal_nogate_and_closed_lora_adapter_vanish(bert):
    s, sites = bert
    gated = unipelt_lib.unipelt(prefix_length=3, prefix_hidden_size=8, reduction_factor=4)
    plain = unipelt_lib.unipelt(gate=False, prefix_length=3, prefix_hidden_size=8,
                                reduction_factor=4)
    delta = perturb(gated.init(jax.random.key(0), s.params, sites), scale=0.3)
    strip = lambda d: {k: paths_lib.unflatten({p: v for p, v in paths_lib.flatten(d[k]).items()
                                               if not any("gate" in c for c in p)}) for k in d}
    f_g, f_p = jpeft.wrap(s.apply, gated, sites), jpeft.wrap(s.apply, plain, sites)
    assert jax.tree.map(jnp.shape, strip(delta)) == jax.tree.map(
        jnp.shape, plain.init(jax.random.key(0), s.params, sites))
    np.testing.assert_allclose(f_g(s.params, _set_gate_bias(delta, 30.0), *s.args),
                               f_p(s.params, strip(delta), *s.args), rtol=1e-5, atol=1e-6)
    # LoRA and adapter gated shut: only the (gated) prefix is left
    closed = _set_gate_bias(delta, -30.0)
    prefix_only = unipelt_lib.prefix_lib.prefix_tuning(3, reparametrize=True, hidden_size=8,
                                                       gate=True)
    want = jpeft.wrap(s.apply, prefix_only, sites)(s.params, closed["prefix"], *s.args)
    np.testing.assert_allclose(f_g(s.params, closed, *s.args), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="gated LoRA"):
        jpeft.wrap(s.apply, lora_lib.lora(gate=True), sites, mode="materialised")(
            s.params, delta["lora"], *s.args)
    assert gated.merge is None


def test_gated_lora_equals_hand_computation(bert):
    """``y = x W + b + G s (x A) B`` with ``G = mean_T sigmoid(x W_g + b_g)`` per example, written
    with flax's interception on the query and value Dense layers."""
    s, sites = bert
    method = lora_lib.lora(rank=2, alpha=4.0, gate=True)
    delta = perturb(method.init(jax.random.key(1), s.params, sites), scale=0.5)
    got = jpeft.wrap(s.apply, method, sites)(s.params, delta, *s.args)
    flat = paths_lib.flatten(delta)

    def icpt(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = ("params",) + context.module.path + ("kernel",)
        if context.method_name == "__call__" and path + ("lora_A",) in flat:
            x = args[0]
            a, b = flat[path + ("lora_A",)], flat[path + ("lora_B",)]
            g = jax.nn.sigmoid(x @ flat[path + ("lora_gate",)] + flat[path + ("lora_gate_bias",)])
            g = g.mean(axis=1, keepdims=True)                           # [B, 1, 1]
            out = out + g * 2.0 * (x @ a @ b)
        return out
    with nn.intercept_methods(icpt):
        want = s.apply(s.params, *s.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["linen_bert", "nnx_decoder_scan"])
def test_gate_values_per_layer_and_example(style):
    s = zoo.build(style)
    sites = jpeft.probe(s.apply, s.params, *s.args)
    method = unipelt_lib.unipelt(prefix_length=2, prefix_hidden_size=8, reduction_factor=4)
    delta = perturb(method.init(jax.random.key(2), s.params, sites), scale=2.0)
    g = jax.jit(unipelt_lib.gate_values(s.apply, method, sites))(s.params, delta, *s.args)
    lead = (2,) if style.endswith("scan") else ()
    for part, shape in (("lora", lead + (2,)), ("prefix", lead + (2, 2)),
                        ("adapter", lead + (2,))):
        assert g[part], part
        for v in g[part].values():
            assert v.shape == shape
            assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
    assert len(g["lora"]) == (2 if lead else 4)
    # examples differ, so do their gates
    some = next(iter(g["adapter"].values()))
    assert not np.allclose(some[..., 0], some[..., 1])
    with pytest.raises(ValueError, match="NoGate|not a gated"):
        unipelt_lib.gate_values(s.apply, unipelt_lib.unipelt(gate=False), sites)
