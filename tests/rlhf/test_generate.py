"""Rollouts by cached generation (jpeft.rlhf.generate) and the one-base models they run on
(jpeft.rlhf.models): the KV-cached tokens equal uncached greedy decoding, mixed batches equal
separate generations, masks and prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.rlhf import generate as gen_lib
from jpeft.rlhf import models


@pytest.fixture(scope="module")
def tiny():
    base = models.build_base(models.decoder_config(48), seed=0)
    method = models.adapter(rank=4, alpha=8.0)
    delta = method.init(jax.random.key(1), base.params, base.sites)
    leaves, tree = jax.tree.flatten(delta)
    delta = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(jax.random.key(10 + i), x.shape)
                                      for i, x in enumerate(leaves)])
    return base, method, delta


PROMPTS = ["the film is ", "a", "it's a very good "]


def test_kv_cached_rollout_equals_uncached_greedy_decoding(tiny):
    """Greedy tokens of the cached program (prefill + scanned one-token steps, the actor's LoRA
    on every contraction) equal a full forward pass per new token, on left-padded prompts of
    different lengths; with the LoRA and without."""
    base, method, delta = tiny
    ids, mask = gen_lib.left_pad(PROMPTS, 12)
    assert mask.sum(1).tolist() == [12, 1, 12]
    n = 7
    cached = gen_lib.make_generator(base, method, new_tokens=n, temperature=0.0)
    rollout = cached(base.params, delta, ids, mask, jax.random.key(0))
    uncached = gen_lib.greedy_uncached(
        lambda i, m: models.run(base, method, base.params, delta, i, m)[0], ids, mask, n)
    np.testing.assert_array_equal(np.asarray(rollout.tokens), uncached)
    assert rollout.prompt_length == 12 and rollout.response_mask.shape == (3, n)
    np.testing.assert_array_equal(np.asarray(rollout.mask), np.concatenate(
        [mask, np.ones((3, n), np.int32)], axis=1))
    plain = gen_lib.make_generator(base, None, new_tokens=n, temperature=0.0)
    reference = gen_lib.greedy_uncached(
        lambda i, m: base.forward(base.params, i, m)[0], ids, mask, n)
    np.testing.assert_array_equal(np.asarray(plain(base.params, None, ids, mask,
                                                   jax.random.key(0)).tokens), reference)
    assert not np.array_equal(reference, uncached)          # the LoRA changes what is said


def test_mixed_generation_serves_actor_and_reference_from_one_base(tiny):
    """One generation of a mixed batch (rows 0..2 the actor, 3..5 the reference) gives each row
    what its own model generates alone."""
    from jpeft import multi
    base, method, delta = tiny
    ids, mask = gen_lib.left_pad(PROMPTS, 12)
    mixed = gen_lib.make_generator(base, multi.mixed(actor=method), new_tokens=5,
                                   temperature=0.0)
    both = mixed(base.params, {"actor": delta}, np.concatenate([ids, ids]),
                 np.concatenate([mask, mask]), jax.random.key(0),
                 jnp.array([0, 0, 0, -1, -1, -1]))
    actor = gen_lib.make_generator(base, method, new_tokens=5, temperature=0.0)(
        base.params, delta, ids, mask, jax.random.key(0))
    ref = gen_lib.make_generator(base, None, new_tokens=5, temperature=0.0)(
        base.params, None, ids, mask, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(both.tokens[:3]), np.asarray(actor.tokens))
    np.testing.assert_array_equal(np.asarray(both.tokens[3:]), np.asarray(ref.tokens))


def test_sampling_is_reproducible_and_masks_follow_the_end_token():
    resp = jnp.array([[5, 46, 256, 256], [1, 2, 3, 4], [46, 256, 256, 256]])
    np.testing.assert_array_equal(gen_lib.response_mask(resp, 46),
                                  [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(gen_lib.response_mask(resp, None), np.ones((3, 4)))
    assert gen_lib.prompts_of(["The Rock is destined to be"], words=3, length=16) == [
        "the rock is "]
    assert gen_lib.prompts_of(["Supercalifragilistic"], words=3, length=8) == ["superca "]
    ids, mask = gen_lib.left_pad(["ab"], 4)
    assert ids.tolist() == [[models.PAD, models.PAD, 97, 98]] and mask.tolist() == [[0, 0, 1, 1]]
    assert gen_lib.decode(ids[0]) == "ab"


def test_sampled_rollouts_depend_on_the_key_only(tiny):
    base, method, delta = tiny
    ids, mask = gen_lib.left_pad(PROMPTS, 12)
    gen = gen_lib.make_generator(base, method, new_tokens=6, temperature=1.0)
    a = gen(base.params, delta, ids, mask, jax.random.key(3)).tokens
    b = gen(base.params, delta, ids, mask, jax.random.key(3)).tokens
    c = gen(base.params, delta, ids, mask, jax.random.key(4)).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_hidden_states_and_scalar_heads(tiny):
    """The split forward gives the causal LM's own logits plus the hidden state they come from;
    the scalar head reads each row's last real token (right padding changes nothing)."""
    from flax import nnx
    from jpeft.models.llama import LlamaForCausalLM
    base, method, delta = tiny
    ids = np.array([[3, 4, 5, 6], [7, 8, 9, 10]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int32)
    logits, hidden = jax.jit(base.forward)(base.params, ids, mask)
    module = LlamaForCausalLM(base.config, rngs=nnx.Rngs(0))       # build_base's seed-0 init
    np.testing.assert_allclose(logits, module(jnp.asarray(ids), jnp.asarray(mask)), atol=1e-5)
    assert hidden.shape == (2, 4, base.config.hidden_size)
    scalar = models.init_scalar(jax.random.key(2), base, method)
    scalar["lora"] = delta
    scores_of = jax.jit(lambda p, d, i, m: models.sequence_scores(base, method, p, d, i, m))
    scores = scores_of(base.params, scalar, ids, mask)
    trimmed = scores_of(base.params, scalar, ids[1:, :2], mask[1:, :2])
    np.testing.assert_allclose(scores[1], trimmed[0], atol=1e-5)
    values = jax.jit(lambda p, d, i, m: models.scalar_values(base, method, p, d, i, m))(
        base.params, scalar, ids, mask)
    np.testing.assert_allclose(scores, [values[0, 3], values[1, 1]], atol=1e-6)
