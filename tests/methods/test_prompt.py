"""Prompt tuning: soft tokens in front of the input embeddings (logits against Hugging Face PEFT are
in tests/interop/test_hf_peft_prompt.py, both directions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
import zoo
from jpeft.methods import prompt as prompt_lib
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def bert():
    s = zoo.build("linen_bert")
    return s, jpeft.probe(s.apply, s.params, *s.args)


def test_init_count_config_and_text_initialisation(bert):
    s, sites = bert
    method = prompt_lib.prompt_tuning(4, init_token_ids=[7, 9, 11])
    delta = method.init(jax.random.key(0), s.params, sites)
    table = s.params["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
    np.testing.assert_array_equal(delta["prompt"], table[np.array([7, 9, 11, 7])])
    assert jpeft.num_params(delta) == 4 * 32
    assert prompt_lib.from_config(method.config).config == method.config
    out = jpeft.wrap(s.apply, method, sites)(s.params, delta, *s.args)
    assert out.shape == (2, 2)
    with pytest.raises(ValueError, match="materialised"):
        jpeft.wrap(s.apply, method, sites, mode="materialised")(s.params, delta, *s.args)


def test_left_padding_sees_the_same_prompt_and_positions():
    """On the decoder a left-padded row gives its real tokens the logits of the unpadded row: the
    prompt comes first, the padding is masked, positions count only real tokens and the prompt."""
    model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48,
                                              num_attention_heads=4, num_key_value_heads=2),
                             rngs=nnx.Rngs(0))
    apply, params = jpeft.nnx.split(model)
    ids = np.array([[5, 6, 7, 8]], np.int32)
    sites = jpeft.probe(apply, params, ids)
    method = prompt_lib.prompt_tuning(3)
    delta = method.init(jax.random.key(1), params, sites)
    f = jpeft.wrap(apply, method, sites)
    plain = f(params, delta, ids)
    assert plain.shape == (1, 3 + 4, 64)
    padded = np.array([[0, 0, 5, 6, 7, 8]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1, 1]], np.int32)
    out = f(params, delta, padded, mask)
    np.testing.assert_allclose(out[:, 3 + 2:], plain[:, 3:], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out[:, :3], plain[:, :3], rtol=2e-5, atol=2e-5)
    assert not np.allclose(plain[:, 3:], apply(params, ids), atol=1e-3)


def test_errors_name_the_problem(bert):
    s, sites = bert
    with pytest.raises(ValueError, match="positive int"):
        prompt_lib.prompt_tuning(0)
    with pytest.raises(ValueError, match=r"select [0-9]+ modules"):
        prompt_lib.prompt_tuning(2, r".*embeddings").init(jax.random.key(0), s.params, sites)
    method = prompt_lib.prompt_tuning(2)
    delta = method.init(jax.random.key(0), s.params, sites)
    ids = jnp.asarray(s.args[0])
    with pytest.raises(ValueError, match=r"should be \[B, T\]"):
        jpeft.wrap(s.apply, method, sites)(s.params, delta, ids[0], *s.args[1:])
    with pytest.raises(ValueError, match="two parts change the model's inputs"):
        both = jpeft.compose(a=method, b=prompt_lib.prompt_tuning(2, name="b"))
        d = both.init(jax.random.key(0), s.params, sites)
        jpeft.wrap(s.apply, both, sites)(s.params, d, *s.args)


def test_cached_generation_with_a_prompt_equals_uncached_decoding():
    """The prompt goes in with the prefill; decoding steps (one token each) keep the model's own
    embeddings; the result equals re-running the whole lengthened sequence at every step."""
    from jpeft.models.llama import generate
    model = LlamaForCausalLM(LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48,
                                              num_attention_heads=4, num_key_value_heads=2),
                             rngs=nnx.Rngs(0))
    apply, params = jpeft.nnx.split(model)
    ids = np.random.default_rng(3).integers(1, 64, (2, 4)).astype(np.int32)
    sites = jpeft.probe(apply, params, ids)
    method = prompt_lib.prompt_tuning(3)
    delta = jax.tree.map(lambda x: 2.0 * x, method.init(jax.random.key(4), params, sites))
    gen, _ = jpeft.nnx.split(model, method=lambda m, x: generate(m, x, max_new_tokens=4))
    cached = np.asarray(jax.jit(jpeft.wrap(gen, method, sites))(params, delta, ids))
    assert cached.shape == (2, 3 + 4 + 4)
    f = jax.jit(jpeft.wrap(apply, method, sites))
    seq = ids
    for _ in range(4):
        nxt = jnp.argmax(f(params, delta, seq)[:, -1], axis=-1).astype(jnp.int32)
        seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
    np.testing.assert_array_equal(cached[:, 3:], seq)
