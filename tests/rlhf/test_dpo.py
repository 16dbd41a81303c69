"""DPO/IPO on one base (jpeft.rlhf.dpo): the reference is the base without a delta; at a zero
policy delta the sigmoid loss is log 2 (IPO: (1 / (2 beta))^2), its gradient matches finite
differences, and training on fixed pairs lowers it."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.rlhf import dpo, models
from jpeft.rlhf.preferences import Pairs

P, R = 6, 5


@pytest.fixture(scope="module")
def setup():
    base = models.build_base(models.decoder_config(24), seed=0)
    method = models.adapter(rank=4, alpha=8.0)
    rng = np.random.default_rng(0)
    n = 8
    prompt = rng.integers(97, 123, (n, P)).astype(np.int32)
    chosen = np.concatenate([prompt, np.full((n, R), ord("a"), np.int32)], 1)
    rejected = np.concatenate([prompt, rng.integers(97, 123, (n, R)).astype(np.int32)], 1)
    mask = np.ones_like(chosen)
    mask[:2, :2] = 0                                       # left-padded prompts
    pairs = Pairs(chosen, mask, rejected, mask.copy(), np.ones(n, np.float32),
                  np.zeros(n, np.float32), P)
    return base, method, pairs


def test_reference_is_the_base_and_zero_delta_gives_log_2(setup):
    base, method, pairs = setup
    zero = method.init(jax.random.key(1), base.params, base.sites)      # LoRA B = 0: no change
    ref = dpo.reference_logps(base, pairs, batch=8)
    idx = np.arange(len(pairs))
    batch = dpo.batch_of(pairs, idx, ref)
    assert batch["chosen_completion"][:, :P].sum() == 0 and batch["chosen_completion"][:, P:].all()
    # the reference's log-probs are the base model's, summed over the completion
    logits, _ = jax.jit(base.forward)(base.params, pairs.chosen, pairs.chosen_mask)
    lp = jax.nn.log_softmax(logits, -1)
    manual = sum(np.take_along_axis(np.asarray(lp[:, t - 1]), pairs.chosen[:, t:t + 1], 1)[:, 0]
                 for t in range(P, P + R))
    np.testing.assert_allclose(ref[0], manual, rtol=1e-5)
    sig = dpo.DPOConfig(beta=0.1, loss_type="sigmoid")
    loss, metrics = jax.jit(lambda d, b: dpo.loss_of(base, method, sig, base.params, d, b))(
        zero, batch)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    assert float(metrics["margin"]) == pytest.approx(0, abs=1e-6)
    ipo = dpo.DPOConfig(beta=0.1, loss_type="ipo")
    ref_avg = dpo.reference_logps(base, pairs, average=True, batch=8)
    loss, _ = jax.jit(lambda d, b: dpo.loss_of(base, method, ipo, base.params, d, b))(
        zero, dpo.batch_of(pairs, idx, ref_avg))
    np.testing.assert_allclose(loss, (1 / (2 * 0.1)) ** 2, rtol=1e-5)


def test_gradient_at_zero_delta_matches_finite_differences(setup):
    base, method, pairs = setup
    zero = method.init(jax.random.key(1), base.params, base.sites)
    batch = dpo.batch_of(pairs, np.arange(len(pairs)), dpo.reference_logps(base, pairs, batch=8))
    config = dpo.DPOConfig(beta=0.5)
    f = jax.jit(lambda d: dpo.loss_of(base, method, config, base.params, d, batch)[0])
    grad = jax.jit(jax.grad(f))(zero)
    leaves, tree = jax.tree.flatten(zero)
    direction = jax.tree.unflatten(tree, [jax.random.normal(jax.random.key(i), x.shape)
                                          for i, x in enumerate(leaves)])
    norm = math.sqrt(sum(float(jnp.sum(v * v)) for v in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda v: v / norm, direction)
    analytic = sum(float(jnp.sum(g * v)) for g, v in zip(jax.tree.leaves(grad),
                                                        jax.tree.leaves(direction)))
    eps = 1e-2
    move = lambda s: jax.tree.map(lambda d, v: d + s * v, zero, direction)
    numeric = (float(f(move(eps))) - float(f(move(-eps)))) / (2 * eps)
    assert abs(analytic) > 1e-3                       # a real signal, not 0 == 0
    assert numeric == pytest.approx(analytic, rel=2e-2, abs=1e-4)
    # the gradient reaches only the LoRA B factors at B = 0 (dL/dA = s x^T (dL/dy) B^T = 0)
    for path, g in jax.tree_util.tree_leaves_with_path(grad):
        if "lora_A" in jax.tree_util.keystr(path):
            assert float(jnp.max(jnp.abs(g))) == 0.0


def test_training_lowers_the_loss_and_ranks_chosen_first(setup):
    base, method, pairs = setup
    delta = method.init(jax.random.key(2), base.params, base.sites)
    fit = dpo.train(base, method, delta, pairs, dpo.DPOConfig(beta=0.5, steps=20, batch=8, lr=2e-2))
    assert fit.losses[0] == pytest.approx(math.log(2), rel=1e-5)
    assert fit.losses[-1] < 0.5 * fit.losses[0] and fit.accuracies[-1] == 1.0
