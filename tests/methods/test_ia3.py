"""IA3: rescaling vectors at module outputs / feed-forward inputs, mergeable; against flax's own
method interception and Hugging Face PEFT's counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require

import jpeft
import zoo
from jpeft.core import paths as paths_lib
from jpeft.methods import ia3 as ia3_lib


def _perturbed(delta, seed=3):
    leaves, tree = jax.tree.flatten(delta)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def bert():
    s = zoo.build("linen_bert")
    return s, jpeft.probe(s.apply, s.params, *s.args)


def test_bert_factored_equals_interception_reference_and_merge(bert):
    s, sites = bert
    method = ia3_lib.ia3()
    ones = method.init(jax.random.key(0), s.params, sites)
    base = jax.jit(s.apply)(s.params, *s.args)
    np.testing.assert_array_equal(jax.jit(jpeft.wrap(s.apply, method, sites))(
        s.params, ones, *s.args), base)
    delta = _perturbed(ones)
    got = jpeft.wrap(s.apply, method, sites)(s.params, delta, *s.args)
    vec = {p[:-2]: v for p, v in paths_lib.flatten(delta).items()}     # module path -> l

    def icpt(next_fun, args, kwargs, context):
        path = ("params",) + context.module.path
        if context.method_name != "__call__" or path not in vec:
            return next_fun(*args, **kwargs)
        if path[-2:] == ("output", "dense"):                  # feed-forward: input rescaled
            return next_fun(args[0] * vec[path], *args[1:], **kwargs)
        return next_fun(*args, **kwargs) * vec[path]
    with nn.intercept_methods(icpt):
        want = s.apply(s.params, *s.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, base, atol=1e-4)
    # targets: key, value, attention output dense and FFN output dense of each layer
    assert len(vec) == 8 and {p[5:] for p in vec} == {
        ("attention", "self", "key"), ("attention", "self", "value"),
        ("attention", "output", "dense"), ("output", "dense")}
    merged = method.merge(s.params, delta, sites)
    np.testing.assert_allclose(s.apply(merged, *s.args), got, rtol=1e-5, atol=1e-6)
    mat = jpeft.wrap(s.apply, method, sites, mode="materialised")(s.params, delta, *s.args)
    np.testing.assert_allclose(mat, got, rtol=1e-5, atol=1e-6)
    back = method.unmerge(merged, delta, sites)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(s.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["nnx_decoder", "nnx_decoder_scan"])
def test_decoder_factored_equals_merged(style):
    s = zoo.build(style)
    sites = jpeft.probe(s.apply, s.params, *s.args)
    method = ia3_lib.ia3()
    delta = _perturbed(method.init(jax.random.key(0), s.params, sites))
    leaves = paths_lib.flatten(delta)
    if style.endswith("scan"):
        assert {v.shape for v in leaves.values()} == {(2, 16), (2, 48)}   # [L, d_kv], [L, F]
    else:
        assert len(leaves) == 6
    got = jpeft.wrap(s.apply, method, sites)(s.params, delta, *s.args)
    want = s.apply(method.merge(s.params, delta, sites), *s.args)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    g = jax.grad(lambda d: jpeft.wrap(s.apply, method, sites)(s.params, d, *s.args).sum())(delta)
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g))


@pytest.mark.torch
def test_count_matches_hugging_face_peft(minilm, minilm_sites):
    require("torch")
    transformers = require("transformers")
    peft = require("peft")
    from jpeft.data.embedded import minilm_dir
    hf = transformers.BertModel.from_pretrained(str(minilm_dir()), local_files_only=True,
                                                add_pooling_layer=False)
    model = peft.get_peft_model(hf, peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                                   feedforward_modules=["output.dense"]))
    trainable, _ = model.get_nb_trainable_parameters()
    delta = ia3_lib.ia3().init(jax.random.key(0), {"params": minilm.params}, minilm_sites)
    assert jpeft.num_params(delta) == trainable


def test_config_rebuilds_and_errors(bert):
    s, sites = bert
    method = ia3_lib.ia3(("key",), (), exclude=("layer/1/attention/self/key",))
    again = ia3_lib.from_config(method.config)
    assert again.config == method.config
    d = again.init(jax.random.key(0), s.params, sites)
    assert len(jax.tree.leaves(d)) == 1
    with pytest.raises(ValueError, match="nothing_here"):
        ia3_lib.ia3(("nothing_here",)).init(jax.random.key(0), s.params, sites)
    with pytest.raises(ValueError, match=r"LayerNorm|not a contraction weight|none can be adapted"):
        ia3_lib.ia3(("attention/output/LayerNorm",)).init(jax.random.key(0), s.params, sites)
