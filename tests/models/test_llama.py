import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_llama, torch_transformers
from flax import nnx
from safetensors.numpy import save_file

from jpeft.models.llama import (KVCache, LlamaConfig, LlamaForCausalLM, apply_rope,
                                attention_lse, causal_mask, convert_layers, generate,
                                grouped_attention, hf_param_shapes, init_cache, llama_to_hf_state, load_hf_llama, positions_from_mask,
                                rotate_half, select_token)

PROMPT_LEN, NEW_TOKENS = 7, 6


def _paths(model):
    return {"/".join(map(str, p)): tuple(v.shape)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _random_model(config, seed=0):
    """A model whose every parameter (norm scales and biases too) is random and O(1)-scaled, so
    that logits are O(1) and a wrong mapping cannot hide behind near-zero values."""
    rng = np.random.default_rng(seed)
    state = {k: (rng.uniform(0.5, 1.5, shape) if k.endswith("norm.weight")
                 else rng.normal(0.0, 0.15, shape)).astype(np.float32)
             for k, shape in hf_param_shapes(config).items()}
    return load_hf_llama(state, config)


def _batch(left: bool, b=3, t=PROMPT_LEN, vocab=128, lengths=(7, 5, 2), seed=0):
    """``(ids, mask)`` int32 ``[b, t]``: row ``r`` holds the same ``lengths[r]`` random tokens
    whichever the side of the padding (id 0, mask 0)."""
    tokens = np.random.default_rng(seed).integers(1, vocab, size=(b, t))
    ids, mask = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    for r, n in enumerate(lengths):
        cols = slice(t - n, t) if left else slice(0, n)
        ids[r, cols], mask[r, cols] = tokens[r, :n], 1
    return ids, mask


@pytest.fixture(scope="module")
def gqa_models():
    """``(unrolled, scanned)`` tiny GQA models (4 heads, 2 kv heads), the same random weights."""
    unrolled = _random_model(LlamaConfig.tiny())
    return unrolled, convert_layers(unrolled, scan_layers=True)


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_hf_dicts(tmp_path):
    c = LlamaConfig.tiny()
    assert (c.head_dim, c.num_key_value_heads, c.num_key_value_groups) == (16, 2, 2)
    assert LlamaConfig.tiny(num_key_value_heads=None).num_key_value_heads == 4
    assert LlamaConfig.tiny(head_dim=32).head_dim == 32

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
          "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-5,
          "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
          "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    c = LlamaConfig.from_dict(hf, scan_layers=True)
    assert (c.rope_theta, c.head_dim, c.num_key_value_heads, c.tie_word_embeddings,
            c.scan_layers, c.rope_scaling) == (500000.0, 8, 1, True, True, None)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(hf, rope_parameters=None, rope_theta=1e4)))
    assert LlamaConfig.from_json_file(path).rope_theta == 1e4
    assert LlamaConfig.tiny(rope_scaling={"rope_type": "default"}).rope_scaling is None


@pytest.mark.parametrize("rope", [{"rope_scaling": {"type": "linear", "factor": 2.0}},
                                  {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
                                  {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}])
def test_unsupported_rope_scaling_raises(rope):
    with pytest.raises(ValueError, match="unsupported rope_scaling"):
        LlamaConfig.from_dict(dict(dataclasses.asdict(LlamaConfig.tiny()), **rope))


def test_config_validation():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig.tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.tiny(hidden_act="nope")


# --------------------------------------------------------------------------- pure functions


def test_rope_rotates_pairs_of_halves():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 2, 8)), jnp.float32)
    np.testing.assert_array_equal(rotate_half(jnp.arange(4.0)), [-2.0, -3.0, 0.0, 1.0])
    angles = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 4)), jnp.float32)
    angles = jnp.concatenate([angles, angles], -1)
    y = jax.jit(apply_rope)(x, jnp.cos(angles), jnp.sin(angles))
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # Dimension i is rotated together with dimension i + D/2 by angle[i].
    a, b = x[..., :4], x[..., 4:]
    c, s = jnp.cos(angles[:, :, None, :4]), jnp.sin(angles[:, :, None, :4])
    np.testing.assert_allclose(y, jnp.concatenate([a * c - b * s, b * c + a * s], -1), atol=1e-6)


def test_positions_and_causal_mask():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])
    np.testing.assert_array_equal(positions_from_mask(mask, jnp.asarray([3, 5])),
                                  [[3, 3, 3, 4, 5], [5, 6, 7, 7, 7]])
    allowed = causal_mask(jnp.arange(5), mask)
    np.testing.assert_array_equal(allowed[0, 3], [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(allowed[1, 4], [1, 1, 1, 0, 0])


def test_grouped_attention_equals_repeated_kv():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 4)), jnp.float32) for _ in range(2))
    allowed = causal_mask(jnp.arange(5), jnp.ones((2, 5)))
    attend = jax.jit(grouped_attention)
    out = attend(q, k, v, allowed)
    # Hugging Face repeat_kv: query head h uses kv head h // 3.
    ref = attend(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2), allowed)
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_attention_and_its_lse_equal_plain_softmax_and_cost_nothing_unused():
    """grouped_attention (jax.nn.dot_product_attention) and attention_lse equal softmax attention
    written out with repeated key/value heads; the lse a model marks but does not use leaves the
    compiled forward's FLOPs unchanged."""
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 5, 6, 4)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 7, 2, 4)), jnp.float32) for _ in range(2))
    key_mask = jnp.asarray([[1] * 7, [1, 1, 1, 1, 1, 0, 0]])
    allowed = causal_mask(jnp.arange(2, 7), key_mask)
    s = jnp.einsum("btnd,bsnd->bnts", q, jnp.repeat(k, 3, axis=2)) / 2.0
    s = jnp.where(allowed[:, None], s, -jnp.inf)
    want = jnp.einsum("bnts,bsnd->btnd", jax.nn.softmax(s, -1), jnp.repeat(v, 3, axis=2))
    np.testing.assert_allclose(grouped_attention(q, k, v, allowed), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(attention_lse(q, k, allowed),
                               jax.nn.logsumexp(s, axis=-1).transpose(0, 2, 1), rtol=1e-5)
    model = LlamaForCausalLM(LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    ids = jnp.ones((2, 6), jnp.int32)
    flops = lambda f: jax.jit(f).lower(ids).compile().cost_analysis()["flops"]
    with_lse = flops(lambda x: model(x))
    import jpeft.models.llama as llama_lib
    saved = llama_lib.attention_lse
    try:
        llama_lib.attention_lse = lambda q, k, allowed: jnp.zeros(q.shape[:3], jnp.float32)
        without = flops(lambda x: model(x))
    finally:
        llama_lib.attention_lse = saved
    assert with_lse == without


def test_select_token_greedy_and_top_k():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 64)
    pick = jax.jit(lambda x, ks, t: jax.vmap(lambda k: select_token(x, k, t, top_k=3))(ks))
    argmax = np.asarray(logits.argmax(-1))
    np.testing.assert_array_equal(select_token(logits), argmax)  # no key: greedy
    np.testing.assert_array_equal(pick(logits, keys, 0.0), np.broadcast_to(argmax, (64, 4)))
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    samples = np.asarray(pick(logits, keys, 5.0))  # same program, sampled
    assert all(samples[i, r] in top3[r] for i in range(64) for r in range(4))
    assert all(len(np.unique(samples[:, r])) == 3 for r in range(4))  # it does sample


# --------------------------------------------------------------------------- structure


def _expected_paths(c, scanned):
    lead = (c.num_hidden_layers,) if scanned else ()
    h, i, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, \
        c.num_key_value_heads * c.head_dim
    layer = {"self_attn/q_proj/kernel": (h, q), "self_attn/k_proj/kernel": (h, kv),
             "self_attn/v_proj/kernel": (h, kv), "self_attn/o_proj/kernel": (q, h),
             "mlp/gate_proj/kernel": (h, i), "mlp/up_proj/kernel": (h, i),
             "mlp/down_proj/kernel": (i, h), "input_layernorm/scale": (h,),
             "post_attention_layernorm/scale": (h,)}
    prefixes = ["model/layers"] if scanned else [f"model/layers/{n}"
                                                 for n in range(c.num_hidden_layers)]
    out = {f"{p}/{k}": lead + s for p in prefixes for k, s in layer.items()}
    out |= {"model/embed_tokens/embedding": (c.vocab_size, h), "model/norm/scale": (h,)}
    if not c.tie_word_embeddings:
        out["lm_head/kernel"] = (h, c.vocab_size)
    return out


@pytest.mark.parametrize("scanned", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_param_tree_mirrors_hugging_face_names(scanned, tied):
    c = LlamaConfig.tiny(scan_layers=scanned, tie_word_embeddings=tied)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(c))
    assert _paths(model) == _expected_paths(c, scanned)
    assert hasattr(model, "lm_head") == (not tied)
    biased = nnx.eval_shape(lambda: LlamaForCausalLM(
        dataclasses.replace(c, attention_bias=True, mlp_bias=True)))
    extra = set(_paths(biased)) - set(_paths(model))
    assert len(extra) == 7 * (1 if scanned else c.num_hidden_layers)
    assert all(p.endswith("_proj/bias") for p in extra)


@pytest.mark.parametrize("scanned", [False, True])
def test_every_projection_is_an_nnx_linear_calling_dot_general(scanned):
    c = LlamaConfig.tiny(scan_layers=scanned)
    model = _random_model(c)
    linears = [(path, m) for path, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
    assert {"/".join(map(str, p)) for p, _ in linears} == {
        k.rsplit("/", 1)[0] for k in _expected_paths(c, scanned) if k.endswith("kernel")}
    seen = []
    for path, lin in linears:
        def spy(lhs, rhs, dims, *a, _path=path, _shape=lin.kernel.shape, **kw):
            seen.append(_path)
            assert rhs.shape == (_shape[1:] if scanned and _path[1:2] == ("layers",) else _shape)
            return jax.lax.dot_general(lhs, rhs, dims, *a, **kw)
        lin.dot_general = spy
    nnx.eval_shape(lambda m, x: m(x), model, jnp.ones((1, 3), jnp.int32))  # traces, no compile
    assert sorted(seen) == sorted(p for p, _ in linears)  # each traced (scanned: once) and called


@pytest.mark.parametrize("scanned", [False, True])
def test_bfloat16_shapes_and_dtypes(scanned):
    c = LlamaConfig.tiny(scan_layers=scanned)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(c, dtype=jnp.bfloat16,
                                                    param_dtype=jnp.bfloat16))
    assert all(v.dtype == jnp.bfloat16 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    cache = init_cache(c, 2, 10, jnp.bfloat16)
    logits, new = nnx.eval_shape(lambda m, i, ca: m(i, cache=ca), model,
                                 jnp.ones((2, 3), jnp.int32), cache)
    assert logits.shape == (2, 3, 128) and logits.dtype == jnp.bfloat16
    assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == jax.tree.map(
        lambda x: (x.shape, x.dtype), cache)


# --------------------------------------------------------------------------- loading


def test_hf_state_round_trip_and_safetensors(tmp_path, gqa_models):
    unrolled, scanned = gqa_models
    state = llama_to_hf_state(unrolled)
    assert "model.layers.1.self_attn.k_proj.weight" in state
    assert state["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)  # [out, in]
    np.testing.assert_array_equal(state["model.layers.1.mlp.up_proj.weight"],
                                  np.asarray(unrolled.model.layers[1].mlp.up_proj.kernel[...]).T)
    scanned_state = llama_to_hf_state(scanned)
    assert scanned_state.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(scanned_state[k], state[k], err_msg=k)

    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(unrolled.config)))
    from_dir = load_hf_llama(tmp_path, scan_layers=True)
    from_file = load_hf_llama(tmp_path / "model.safetensors", unrolled.config,
                              param_dtype=jnp.bfloat16)
    assert from_dir.config.scan_layers and from_dir.model.layers.mlp.up_proj.kernel.shape[0] == 2
    for k, v in llama_to_hf_state(from_dir).items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)
    assert from_file.model.norm.scale[...].dtype == jnp.bfloat16


def test_tied_checkpoint_with_or_without_lm_head():
    c = LlamaConfig.tiny(tie_word_embeddings=True)
    state = llama_to_hf_state(_random_model(c))
    assert "lm_head.weight" not in state
    with_head = dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"]})
    model = load_hf_llama(with_head, c)  # a torch state_dict() of a tied model has both
    assert not hasattr(model, "lm_head")
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_hf_llama(dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"] + 1}), c)


@pytest.mark.parametrize("scanned", [False, True])
def test_loader_errors_name_the_key(scanned):
    c = LlamaConfig.tiny(scan_layers=scanned)
    state = {k: np.zeros(s, np.float32) for k, s in hf_param_shapes(c).items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(8, np.float32)  # ignored
    load_hf_llama(state, c)

    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError,
                       match=r"missing keys \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        load_hf_llama(missing, c)
    for key in ("model.layers.0.mlp.extra_proj.weight", "model.layers.2.mlp.up_proj.weight",
                "model.layers.0.self_attn.q_proj.bias"):
        with pytest.raises(ValueError, match=rf"unexpected keys \['{key.replace('.', '[.]')}'\]"):
            load_hf_llama(dict(state, **{key: np.zeros(64, np.float32)}), c)
    bad = dict(state)
    bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 32), np.float32)  # transposed
    with pytest.raises(ValueError, match=r"shape mismatch for 'model\.layers\.1\.self_attn\.k_proj"
                                         r"\.weight'.*\(64, 32\).*\(32, 64\)"):
        load_hf_llama(bad, c)
    with pytest.raises(ValueError, match="needs a config"):
        load_hf_llama(state)


# --------------------------------------------------------------------------- forward and cache


@pytest.mark.parametrize("left", [False, True])
def test_unrolled_and_scanned_give_the_same_logits(gqa_models, left):
    unrolled, scanned = gqa_models
    ids, mask = _batch(left)
    a, b = _forward(unrolled, ids, mask), _forward(scanned, ids, mask)
    assert a.shape == (3, PROMPT_LEN, 128) and float(jnp.abs(a).max()) > 1.0
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5, rtol=0)
    back = convert_layers(scanned, scan_layers=False)
    np.testing.assert_array_equal(_forward(back, ids, mask), a)


def test_left_and_right_padding_give_the_same_real_logits(gqa_models):
    """Left padding (positions from the mask) gives the logits of right padding, i.e. of the
    unpadded rows (causality hides right padding from real tokens)."""
    model = gqa_models[0]
    ids_l, mask_l = _batch(left=True)
    ids_r, mask_r = _batch(left=False)
    left, right = _forward(model, ids_l, mask_l), _forward(model, ids_r, mask_r)
    np.testing.assert_allclose(np.asarray(left)[mask_l.astype(bool)],
                               np.asarray(right)[mask_r.astype(bool)], atol=1e-5, rtol=0)


def test_chunked_cache_forward_equals_full_forward(gqa_models):
    """Scanned layers, so the cache is scanned too (the unrolled cache is checked by generate)."""
    model = gqa_models[1]
    ids, mask = _batch(left=True)
    full = np.asarray(_forward(model, ids, mask))
    step = nnx.jit(lambda m, i, k, c: m(i, k, cache=c))
    cache = init_cache(model.config, 3, PROMPT_LEN + 1)
    assert isinstance(cache, KVCache) and cache.keys.shape == (2, 3, PROMPT_LEN + 1, 2, 16)
    logits, cache = step(model, ids[:, :4], mask[:, :4], cache)
    chunks = [np.asarray(logits)]
    for t in range(4, PROMPT_LEN):
        logits, cache = step(model, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        chunks.append(np.asarray(logits))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1)[real], full[real], atol=1e-5)
    assert int(cache.length) == PROMPT_LEN
    np.testing.assert_array_equal(cache.next_position, [7, 5, 2])
    np.testing.assert_array_equal(cache.mask[:, :PROMPT_LEN], mask)
    assert not cache.mask[:, PROMPT_LEN:].any()


# --------------------------------------------------------------------------- generation


def _greedy_without_cache(model, ids, mask, n):
    """Greedy decoding by re-running the whole (fixed-size) sequence every step, no cache: the
    next token of each row is the argmax at its last real position."""
    b, t = ids.shape
    seq = np.concatenate([ids, np.zeros((b, n), np.int32)], axis=1)
    seq_mask = np.concatenate([mask, np.zeros((b, n), np.int32)], axis=1)
    for i in range(n):
        logits = np.asarray(_forward(model, seq, seq_mask))
        seq[:, t + i] = logits[:, t + i - 1].argmax(-1)
        seq_mask[:, t + i] = 1
    return seq


def test_greedy_generate_with_cache_equals_recomputing(gqa_models):
    """Left-padded batch; the scanned model (scanned cache) generates what the unrolled one does."""
    unrolled, scanned = gqa_models
    ids, mask = _batch(left=True)
    out = np.asarray(generate(unrolled, ids, mask, NEW_TOKENS))
    assert out.shape == (3, PROMPT_LEN + NEW_TOKENS) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :PROMPT_LEN], ids)
    np.testing.assert_array_equal(out, _greedy_without_cache(unrolled, ids, mask, NEW_TOKENS))
    np.testing.assert_array_equal(generate(scanned, ids, mask, NEW_TOKENS), out)


def test_right_padded_prompts_generate_like_left_padded(gqa_models):
    model = gqa_models[0]
    ids_l, mask_l = _batch(left=True)
    ids_r, mask_r = _batch(left=False)
    np.testing.assert_array_equal(generate(model, ids_r, mask_r, NEW_TOKENS)[:, PROMPT_LEN:],
                                  generate(model, ids_l, mask_l, NEW_TOKENS)[:, PROMPT_LEN:])


def test_sampling_is_reproducible_and_temperature_zero_is_greedy(gqa_models):
    model = gqa_models[0]
    ids, mask = _batch(left=True)
    greedy = np.asarray(generate(model, ids, mask, NEW_TOKENS))
    key = jax.random.key(1)
    np.testing.assert_array_equal(generate(model, ids, mask, NEW_TOKENS, temperature=0.0, key=key),
                                  greedy)
    a = np.asarray(generate(model, ids, mask, NEW_TOKENS, temperature=1.5, key=key))
    b = np.asarray(generate(model, ids, mask, NEW_TOKENS, temperature=1.5, key=key))
    c = np.asarray(generate(model, ids, mask, NEW_TOKENS, temperature=1.5, key=jax.random.key(2)))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any() and (a != greedy).any()
    with pytest.raises(ValueError, match="key"):
        generate(model, ids, mask, NEW_TOKENS, temperature=1.0)
    np.testing.assert_array_equal(generate(model, ids, mask, 0), ids)


def test_generation_stops_at_eos(gqa_models):
    model = gqa_models[0]
    ids, mask = _batch(left=True)
    greedy = np.asarray(generate(model, ids, mask, NEW_TOKENS))
    eos = int(greedy[0, PROMPT_LEN + 1])
    out = np.asarray(generate(model, ids, mask, NEW_TOKENS, eos_token_id=eos, pad_token_id=0))
    for row in range(3):
        new, ref = out[row, PROMPT_LEN:], greedy[row, PROMPT_LEN:]
        stop = int(np.argmax(ref == eos)) if (ref == eos).any() else NEW_TOKENS
        np.testing.assert_array_equal(new[:stop + 1], ref[:stop + 1])
        assert (new[stop + 1:] == 0).all()


# --------------------------------------------------------------------------- PyTorch cross-checks


HF_CASES = {
    "untied-gqa": (dict(), False),
    "tied-gqa-scan": (dict(tie_word_embeddings=True), True),
    "tied-mha-bias-head_dim32": (dict(tie_word_embeddings=True, num_key_value_heads=4, head_dim=32,
                                      attention_bias=True, mlp_bias=True), False),
    "untied-mqa-scan": (dict(num_key_value_heads=1, rope_theta=500000.0), True),
}


@pytest.mark.torch
@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_match_transformers(case, monkeypatch):
    torch, transformers = torch_transformers(monkeypatch)
    overrides, scanned = HF_CASES[case]
    hf = hf_llama(torch, transformers, **overrides)
    config = LlamaConfig.from_dict(hf.config.to_dict(), scan_layers=scanned)
    assert config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    model = load_hf_llama({k: v.numpy() for k, v in hf.state_dict().items()}, config)

    for left in (False, True):
        ids, mask = _batch(left)
        positions = np.asarray(positions_from_mask(mask))
        with torch.no_grad():
            ref = hf(input_ids=torch.from_numpy(ids.astype(np.int64)),
                     attention_mask=torch.from_numpy(mask.astype(np.int64)),
                     position_ids=torch.from_numpy(positions.astype(np.int64))).logits.numpy()
        ours = np.asarray(_forward(model, ids, mask))
        real = mask.astype(bool)
        assert np.abs(ref[real]).max() > 1.0  # not a vacuous comparison
        np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0,
                                   err_msg=f"{case}, {'left' if left else 'right'} padding")


@pytest.mark.torch
def test_greedy_generate_matches_transformers(monkeypatch):
    torch, transformers = torch_transformers(monkeypatch)
    hf = hf_llama(torch, transformers)
    config = LlamaConfig.from_dict(hf.config.to_dict())
    model = load_hf_llama({k: v.numpy() for k, v in hf.state_dict().items()}, config)
    ids, mask = _batch(left=True)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(mask.astype(np.int64)),
                          max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(generate(model, ids, mask, NEW_TOKENS)), ref)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_change_memory_not_values(scan):
    """``LlamaConfig.remat``: the loss and its gradient are the same under every policy, and the
    compiled gradient's temporaries shrink from "none" to "full"."""
    import optax

    import jpeft
    base = LlamaConfig.tiny(num_hidden_layers=3, scan_layers=scan)
    ids = np.random.default_rng(0).integers(1, base.vocab_size, (4, 32)).astype(np.int32)
    out, temps = {}, {}
    for remat in ("none", "dots", "full"):
        model = LlamaForCausalLM(dataclasses.replace(base, remat=remat), rngs=nnx.Rngs(0))
        apply, params = jpeft.nnx.split(model)

        def loss(p):
            logits = apply(p, ids)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], ids[:, 1:]).mean()
        g = jax.jit(jax.value_and_grad(loss))
        out[remat] = g(params)
        temps[remat] = g.lower(params).compile().memory_analysis().temp_size_in_bytes
    for remat in ("dots", "full"):
        np.testing.assert_allclose(out[remat][0], out["none"][0], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(out[remat][1]), jax.tree.leaves(out["none"][1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert temps["full"] < temps["none"]
    with pytest.raises(ValueError, match=r"remat='some'"):
        LlamaConfig.tiny(remat="some")
