"""The reward model (jpeft.rlhf.reward): base + LoRA + scalar head, the pairwise loss of
jpeft.rlhf.losses; its loss decreases on fixed pairs while the base stays as it was."""

import jax
import numpy as np
import pytest

from jpeft.rlhf import losses, models, reward
from jpeft.rlhf.preferences import Pairs


@pytest.fixture(scope="module")
def setup():
    base = models.build_base(models.decoder_config(24), seed=0)
    method = models.adapter(rank=4, alpha=8.0)
    rng = np.random.default_rng(0)
    n, p, r = 32, 6, 6
    prompt = rng.integers(97, 123, (n, p)).astype(np.int32)
    good = np.stack([rng.choice(np.frombuffer(b"great fun ", np.uint8), r) for _ in range(n)])
    bad = np.stack([rng.choice(np.frombuffer(b"dull mess ", np.uint8), r) for _ in range(n)])
    chosen = np.concatenate([prompt, good.astype(np.int32)], 1)
    rejected = np.concatenate([prompt, bad.astype(np.int32)], 1)
    mask = np.ones_like(chosen)
    pairs = Pairs(chosen, mask, rejected, mask.copy(), np.ones(n, np.float32),
                  np.zeros(n, np.float32), p)
    return base, method, pairs


def test_reward_loss_decreases_on_fixed_pairs(setup):
    base, method, pairs = setup
    delta = models.init_scalar(jax.random.key(0), base, method)
    before_params = jax.tree.map(np.array, base.params)
    batch = reward.batch_of(pairs, np.arange(8))
    loss, metrics = jax.jit(lambda d, b: reward.pair_loss(base, method, base.params, d, b))(
        delta, batch)
    scores = models.sequence_scores(base, method, base.params, delta,
                                    np.concatenate([batch["chosen"], batch["rejected"]]),
                                    np.concatenate([batch["chosen_mask"],
                                                    batch["rejected_mask"]]))
    np.testing.assert_allclose(loss, losses.reward_pair_loss(scores[:8], scores[8:]), rtol=1e-5)
    start = reward.evaluate(base, method, delta, pairs, batch=32)
    fit = reward.train(base, method, delta, pairs, steps=25, batch=16, lr=1e-2)
    end = reward.evaluate(base, method, fit.delta, pairs, batch=32)
    assert np.mean(fit.losses[-5:]) < 0.5 * np.mean(fit.losses[:5])
    assert end["loss"] < 0.5 * start["loss"] and end["accuracy"] == 1.0
    assert set(fit.delta) == {"lora", "head"} and fit.delta["head"]["kernel"].shape == (64, 1)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base.params),
                                                    jax.tree.leaves(before_params)))
