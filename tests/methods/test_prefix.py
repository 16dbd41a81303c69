"""Prefix tuning against attention computed by hand over the concatenated keys and values, on the
linen BERT (bidirectional, padding mask) and the NNX decoder (causal, grouped-query, scanned,
cached generation); the reparametrisation folded away; Hugging Face PEFT's counts."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require

import jpeft
from jpeft.core import paths as paths_lib
from jpeft.methods import prefix as prefix_lib
from jpeft.models.bert import BertConfig, BertForSequenceClassification, attention_bias
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM, generate


@pytest.fixture(scope="module")
def bert():
    model = BertForSequenceClassification(BertConfig.tiny(num_labels=2, pooling="mean"))
    ids = np.random.default_rng(0).integers(1, 100, (2, 6)).astype(np.int32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
    variables = model.init(jax.random.key(0), ids)
    args = (ids, mask, np.zeros_like(ids))
    return model, variables, args, jpeft.probe(model.apply, variables, *args)


def _hand_prefix_attention(params, hidden, mask, pk, pv, heads):
    """BERT self-attention over [prefix; keys] with the mask extended by ones, from the weights."""
    b, t, h = hidden.shape
    d = h // heads
    proj = lambda name: (hidden @ params[name]["kernel"] + params[name]["bias"]).reshape(
        b, t, heads, d)
    q, k, v = proj("query"), proj("key"), proj("value")
    k = jnp.concatenate([jnp.broadcast_to(pk, (b,) + pk.shape), k], axis=1)
    v = jnp.concatenate([jnp.broadcast_to(pv, (b,) + pv.shape), v], axis=1)
    full_mask = jnp.concatenate([jnp.ones((b, pk.shape[0]), mask.dtype), mask], axis=1)
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d) + attention_bias(
        full_mask, jnp.float32)
    return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(scores, -1), v).reshape(b, t, h)


def test_prefix_equals_attention_over_concatenated_keys_and_values(bert):
    model, variables, args, sites = bert
    method = prefix_lib.prefix_tuning(3)
    delta = method.init(jax.random.key(0), variables, sites)
    pre = {p[:-1]: {} for p in paths_lib.flatten(delta)}
    for p, v in paths_lib.flatten(delta).items():
        pre[p[:-1]][p[-1]] = v
    assert len(pre) == 2 and all(v["prefix_keys"].shape == (3, 4, 8) for v in pre.values())
    got = jax.jit(jpeft.wrap(model.apply, method, sites))(variables, delta, *args)

    def icpt(next_fun, a, kw, context):
        path = context.module.path
        if context.method_name == "__call__" and path[-1:] == ("position_embeddings",):
            return next_fun(a[0] + 3, **kw)          # the tokens sit after the 3 prefix slots
        if context.method_name == "__call__" and path in pre:
            p = variables["params"]
            for name in path:
                p = p[name]
            return _hand_prefix_attention(p, a[0], a[1], pre[path]["prefix_keys"],
                                          pre[path]["prefix_values"], 4)
        return next_fun(*a, **kw)
    with nn.intercept_methods(icpt):
        want = model.apply(variables, *args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(want, model.apply(variables, *args), atol=1e-4)


def _decoder(kv_heads, scan):
    config = LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_attention_heads=4, num_key_value_heads=kv_heads,
                              attention_bias=True, scan_layers=scan)
    return LlamaForCausalLM(config, rngs=nnx.Rngs(0))


def test_grouped_query_prefix_equals_repeated_heads_scanned():
    """GQA (4 query heads, 2 key/value heads, layers stacked by nnx.scan) with a prefix equals the
    same model written with 4 key/value heads (each of the 2 repeated, weights and prefixes alike):
    query head n reads prefix head n // 2."""
    ids = np.random.default_rng(1).integers(1, 64, (2, 5)).astype(np.int32)
    apply_g, params_g = jpeft.nnx.split(_decoder(2, True))
    apply_f, params_f = jpeft.nnx.split(_decoder(4, True))
    rep = lambda w, axis: jnp.repeat(w.reshape(w.shape[:axis] + (2, 8)), 2, axis=axis).reshape(
        w.shape[:axis] + (32,))
    params_f = jax.tree.map(lambda x: x, params_g)
    attn = params_f["model"]["layers"]["self_attn"]
    for name in ("k_proj", "v_proj"):
        attn[name] = {"kernel": rep(attn[name]["kernel"], 2), "bias": rep(attn[name]["bias"], 1)}
    s_g, s_f = jpeft.probe(apply_g, params_g, ids), jpeft.probe(apply_f, params_f, ids)
    method = prefix_lib.prefix_tuning(3)
    d_g = method.init(jax.random.key(2), params_g, s_g)
    scope = paths_lib.flatten(d_g)
    assert {v.shape for v in scope.values()} == {(2, 3, 2, 8)}            # [L, l, K, D]
    d_f = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=2), d_g)
    np.testing.assert_allclose(apply_f(params_f, ids), apply_g(params_g, ids), rtol=1e-5,
                               atol=1e-5)
    got = jpeft.wrap(apply_g, method, s_g)(params_g, d_g, ids)
    want = jpeft.wrap(apply_f, method, s_f)(params_f, d_f, ids)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert not np.allclose(got, apply_g(params_g, ids), atol=1e-3)


def test_cached_generation_with_a_prefix_equals_uncached_decoding():
    model = _decoder(2, False)
    ids = np.random.default_rng(3).integers(1, 64, (2, 4)).astype(np.int32)
    apply, params = jpeft.nnx.split(model)
    sites = jpeft.probe(apply, params, ids)
    method = prefix_lib.prefix_tuning(4)
    delta = jax.tree.map(lambda x: 3.0 * x, method.init(jax.random.key(4), params, sites))
    gen, _ = jpeft.nnx.split(model, method=lambda m, x: generate(m, x, max_new_tokens=5))
    cached = jax.jit(jpeft.wrap(gen, method, sites))(params, delta, ids)
    f = jax.jit(jpeft.wrap(apply, method, sites))
    seq = ids
    for _ in range(5):
        nxt = jnp.argmax(f(params, delta, seq)[:, -1], axis=-1).astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(cached, seq)
    plain = generate(model, ids, max_new_tokens=5)
    assert not np.array_equal(plain, seq)          # the prefix changes what is generated


def test_reparametrisation_folds_to_the_same_outputs_and_counts(bert):
    model, variables, args, sites = bert
    method = prefix_lib.prefix_tuning(5, reparametrize=True, hidden_size=16)
    delta = method.init(jax.random.key(0), variables, sites)
    # l d + d h + h + h (n_layers 2 K D) + n_layers 2 K D, with d = 32, 2 layers, K D = 32
    n_out = 2 * 2 * 32
    assert jpeft.num_params(delta) == 5 * 32 + 32 * 16 + 16 + 16 * n_out + n_out
    served = prefix_lib.folded(method)
    folded = prefix_lib.fold(method, delta, sites)
    assert jpeft.num_params(folded) == 2 * 2 * 5 * 32
    np.testing.assert_allclose(jpeft.wrap(model.apply, served, sites)(variables, folded, *args),
                               jpeft.wrap(model.apply, method, sites)(variables, delta, *args),
                               rtol=1e-5, atol=1e-6)
    assert prefix_lib.from_config(served.config).config == served.config
    with pytest.raises(ValueError, match="not a reparametrised"):
        prefix_lib.fold(served, folded, sites)
    with pytest.raises(ValueError, match="materialised"):
        jpeft.wrap(model.apply, served, sites, mode="materialised")(variables, folded, *args)


def test_models_without_hook_points_get_a_clear_error(bert):
    import zoo
    s = zoo.build("linen_mha")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    with pytest.raises(ValueError, match=r"no context sites.*kinds \['in', 'out'\]"):
        prefix_lib.prefix_tuning(2).init(jax.random.key(0), s.params, sites)
    # a model with attention hook points but no position ids: say how to go on
    model, variables, args, bert_sites = bert
    no_pos = bert_sites._replace(marks={k: m for k, m in bert_sites.marks.items()
                                        if m.kind != "positions"})
    method = prefix_lib.prefix_tuning(2)
    delta = method.init(jax.random.key(0), variables, no_pos)
    with pytest.raises(ValueError, match=r"shift_positions=True; pass False"):
        jpeft.wrap(model.apply, method, no_pos)(variables, delta, *args)
    unshifted = prefix_lib.prefix_tuning(2, shift_positions=False)
    assert jpeft.wrap(model.apply, unshifted, no_pos)(variables, delta, *args).shape == (2, 2)


@pytest.mark.torch
@pytest.mark.parametrize("projection", [False, True])
def test_count_matches_hugging_face_peft(minilm, minilm_sites, projection):
    require("torch")
    transformers = require("transformers")
    peft = require("peft")
    from jpeft.data.embedded import minilm_dir
    hf = transformers.BertModel.from_pretrained(str(minilm_dir()), local_files_only=True,
                                                add_pooling_layer=False)
    config = peft.PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=10,
                                     prefix_projection=projection, encoder_hidden_size=512)
    trainable, _ = peft.get_peft_model(hf, config).get_nb_trainable_parameters()
    delta = prefix_lib.prefix_tuning(10, reparametrize=projection).init(
        jax.random.key(0), {"params": minilm.params}, minilm_sites)
    assert jpeft.num_params(delta) == trainable
