"""One PPO iteration on one base (jpeft.rlhf.ppo): the loss terms are jpeft.rlhf.losses', only the
actor and critic deltas change, the base is bit-identical after, the reference log-probs are the
base model's, and all four models are served from one params tree."""

import jax
import numpy as np
import pytest

import jpeft
from jpeft.rlhf import generate as gen_lib
from jpeft.rlhf import losses, models
from jpeft.rlhf import ppo as ppo_lib

CONFIG = ppo_lib.PPOConfig(new_tokens=5, ppo_epochs=2, lr=1e-2, kl_coef=0.05)


def _noisy(tree, seed, scale=0.2):
    leaves, t = jax.tree.flatten(tree)
    return jax.tree.unflatten(t, [x + scale * jax.random.normal(jax.random.key(seed + i), x.shape)
                                  for i, x in enumerate(leaves)])


@pytest.fixture(scope="module")
def setup():
    base = models.build_base(models.decoder_config(32), seed=0)
    method = models.adapter(rank=4, alpha=8.0)
    reward = models.init_scalar(jax.random.key(5), base, method)
    reward = {"lora": _noisy(reward["lora"], 100), "head": reward["head"]}
    ids, mask = gen_lib.left_pad(["the film is ", "bad ", "it's a ", "a great "] * 2, 12)
    return base, method, models.placed(reward, base.params), ids, mask


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_one_ppo_iteration(setup, monkeypatch):
    base, method, reward, ids, mask = setup
    called = []
    for name in ("kl_penalized_rewards", "gae", "whiten", "ppo_policy_loss", "ppo_value_loss"):
        real = getattr(losses, name)
        monkeypatch.setattr(losses, name, lambda *a, _real=real, _n=name, **k: (
            called.append(_n), _real(*a, **k))[1])
    ppo = ppo_lib.make_ppo(base, method, CONFIG)
    state = ppo_lib.init_state(ppo, jax.random.key(3), reward)

    # One base: every compiled piece is handed the same params object.
    seen = []
    spy = lambda f: (lambda params, *a, **k: (seen.append(params), f(params, *a, **k))[1])
    ppo = ppo._replace(generate=spy(ppo.generate), experience=spy(ppo.experience),
                       step=spy(ppo.step))
    params_before, reward_before = _host(base.params), _host(reward)
    trainable_before = _host(state.trainable)

    new, exp, metrics = ppo_lib.iteration(ppo, base.params, state, reward, ids, mask,
                                          jax.random.key(7))
    assert len(seen) == 2 + CONFIG.ppo_epochs and all(p is base.params for p in seen)
    assert set(called) == {"kl_penalized_rewards", "gae", "whiten", "ppo_policy_loss",
                           "ppo_value_loss"}
    assert metrics["steps"] == CONFIG.ppo_epochs and metrics["skipped"] == 0

    # Only the actor and critic deltas change; the base and the reward model are untouched.
    assert _equal(base.params, params_before) and _equal(reward, reward_before)
    assert not any(x.is_deleted() for x in jax.tree.leaves((base.params, reward)))
    for part in ("actor", "critic"):
        assert not _equal(new.trainable[part], trainable_before[part]), part
    assert not _equal(new.trainable["critic"]["head"], trainable_before["critic"]["head"])

    # The experience is losses.py's math on the four models' outputs.
    m = exp.response_mask
    logits, _ = jax.jit(base.forward)(base.params, exp.tokens, exp.mask)
    ref = losses.token_logprobs(logits, exp.tokens, exp.mask)[:, -m.shape[1]:]
    np.testing.assert_allclose(exp.ref_logprobs, ref, atol=1e-5)          # reference = base
    np.testing.assert_allclose(exp.logprobs, exp.ref_logprobs, atol=1e-5)  # fresh actor = ref
    rewards = losses.kl_penalized_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, m,
                                          CONFIG.kl_coef)
    np.testing.assert_allclose(exp.rewards, rewards, atol=1e-6)
    adv, ret = losses.gae(rewards, exp.values, m, CONFIG.gamma, CONFIG.lam)
    np.testing.assert_allclose(exp.advantages, losses.whiten(adv, m), atol=1e-5)
    np.testing.assert_allclose(exp.returns, ret, atol=1e-6)
    scores = models.sequence_scores(base, method, base.params, reward, exp.tokens, exp.mask)
    np.testing.assert_allclose(exp.scores, scores, atol=1e-5)

    # The first step's loss terms: ratio 1 and unchanged values.
    fresh = ppo_lib.init_state(ppo, jax.random.key(3), reward)
    _, _, first = ppo_lib.make_ppo(base, method, CONFIG).step(
        base.params, fresh.trainable, fresh.opt_state, exp, jax.random.key(0))
    pg, _, kl = losses.ppo_policy_loss(exp.logprobs, exp.logprobs, exp.advantages, m)
    vf, _ = losses.ppo_value_loss(exp.values, exp.values, exp.returns, m)
    np.testing.assert_allclose(first["pg_loss"], pg, atol=1e-5)
    np.testing.assert_allclose(first["vf_loss"], vf, rtol=1e-4)
    np.testing.assert_allclose(first["loss"], pg + CONFIG.vf_coef * vf, rtol=1e-4, atol=1e-6)
    assert float(first["approx_kl"]) < 1e-8


def test_mixed_scoring_equals_four_forward_passes(setup):
    """The four models in one mixed forward of 4B rows give the numbers of four separate passes;
    the compiled PPO step holds one copy of the base among its arguments."""
    base, method, reward, ids, mask = setup
    ppo = ppo_lib.make_ppo(base, method, CONFIG)
    state = ppo_lib.init_state(ppo, jax.random.key(3), reward)
    trainable = {"actor": _noisy(state.trainable["actor"], 200, 0.1),
                 "critic": state.trainable["critic"]}
    rollout = ppo.generate(base.params, trainable["actor"], ids, mask, jax.random.key(1))
    deltas = {**trainable, "reward": reward}
    score = lambda mixed: jax.jit(lambda p, d, r: ppo_lib.score_rollout(
        base, method, p, d, r, mixed=mixed))(base.params, deltas, rollout)
    for a, b in zip(score(True), score(False)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    exp = ppo.experience(base.params, state.trainable, reward, rollout)
    mem = ppo_lib.step_memory(ppo, base.params, state, exp)
    # The step's arguments: one base, the trained deltas and their optimizer state, and the
    # experience less what the loss does not read (XLA prunes the rewards, scores and reference
    # log-probs, and the step's key): one copy of the base, not four.
    fixed = sum(jpeft.num_bytes(a) for a in (base.params, state.trainable, state.opt_state))
    unused = sum(jpeft.num_bytes(x) for x in (exp.rewards, exp.scores, exp.ref_logprobs))
    assert mem["argument_bytes"] == fixed + jpeft.num_bytes(exp) - unused, mem
    assert mem["argument_bytes"] < 2 * jpeft.num_bytes(base.params)
    assert jpeft.num_bytes(state.trainable) < jpeft.num_bytes(base.params)
