"""BitFit: which biases, how many, exactness, and the no-bias error."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.core import paths
from jpeft.methods.bitfit import QUERY_AND_FFN_INTERMEDIATE


def _bias_count(tree, pred=lambda p: True):
    return sum(int(np.prod(x.shape)) for p, x in paths.flatten(tree).items()
               if p[-1] == "bias" and pred(p))


def test_all_biases_including_layer_norm(tiny_bert):
    _, params = tiny_bert
    variables = {"params": params}
    delta = jpeft.bitfit().init(jax.random.key(0), variables)
    assert jpeft.num_params(delta) == _bias_count(variables)
    got = {paths.path_str(p) for p in paths.flatten(delta)}
    assert "params/bert/encoder/layer/0/attention/output/LayerNorm/bias" in got
    assert "params/bert/embeddings/LayerNorm/bias" in got
    assert all(p.endswith("/bias") for p in got)


def test_survey_subset_query_and_ffn_intermediate(tiny_bert, tiny_config):
    _, params = tiny_bert
    delta = jpeft.bitfit(QUERY_AND_FFN_INTERMEDIATE).init(jax.random.key(0), {"params": params})
    c = tiny_config
    assert jpeft.num_params(delta) == c.num_hidden_layers * (c.hidden_size + c.intermediate_size)


def test_zero_delta_exact_and_merge_equals_forward(tiny_bert, tiny_batch):
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.bitfit()
    delta = method.init(jax.random.key(0), variables)
    base = model.apply(variables, **tiny_batch)
    f = jpeft.wrap(model.apply, method)
    np.testing.assert_array_equal(f(variables, delta, **tiny_batch), base)
    delta = jax.tree.map(lambda x: x + 0.3, delta)
    out = f(variables, delta, **tiny_batch)
    assert not np.allclose(out, base, atol=1e-3)
    # Independent reference: add the bias shift to the base tree by hand.
    shifted = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.3 if paths.to_path(kp)[-1] == "bias" else x, variables)
    np.testing.assert_allclose(out, model.apply(shifted, **tiny_batch), atol=1e-6)
    np.testing.assert_allclose(model.apply(method.merge(variables, delta), **tiny_batch), out, atol=1e-6)


def test_a_model_without_bias_is_an_error():
    class NoBias(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, use_bias=False)(nn.LayerNorm(use_bias=False)(x))
    variables = NoBias().init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"bitfit: the tree has no leaf with name in \('bias',\).*kernel"):
        jpeft.bitfit().init(jax.random.key(0), variables)


def test_targets_that_match_no_bias(tiny_bert):
    _, params = tiny_bert
    with pytest.raises(ValueError, match="bitfit: targets"):
        jpeft.bitfit(("quary",)).init(jax.random.key(0), {"params": params})
