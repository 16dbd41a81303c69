"""Held-out evaluation (jpeft.rlhf.evaluate): the exact per-token KL, and several policies
generated together from one base (the reference's KL is 0, a policy's is not)."""

import jax
import numpy as np

from jpeft.rlhf import evaluate as eval_lib
from jpeft.rlhf import generate as gen_lib
from jpeft.rlhf import models


def test_token_kl_is_the_exact_kl_over_the_response():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(2, 6, 5)), rng.normal(size=(2, 6, 5))
    resp = np.array([[1, 1, 1], [1, 1, 0]])
    got = eval_lib.token_kl(p, q, resp)
    lp, lq = jax.nn.log_softmax(p, -1), jax.nn.log_softmax(q, -1)
    kl = np.sum(np.exp(lp) * (lp - lq), -1)[:, 2:5]             # logits 2..4 predict 3..5
    np.testing.assert_allclose(got, [kl[0].mean(), kl[1, :2].mean()], rtol=1e-5)
    np.testing.assert_allclose(eval_lib.token_kl(p, p, resp), [0, 0], atol=1e-7)


def test_policies_generated_together_and_measured():
    base = models.build_base(models.decoder_config(32), seed=0)
    method = models.adapter(rank=4, alpha=8.0)
    delta = method.init(jax.random.key(1), base.params, base.sites)
    leaves, tree = jax.tree.flatten(delta)
    delta = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(jax.random.key(9 + i), x.shape)
                                      for i, x in enumerate(leaves)])
    reward = models.init_scalar(jax.random.key(2), base, method)
    ids, mask = gen_lib.left_pad(["the film is ", "bad ", "a "], 12)
    evaluator = eval_lib.Evaluator(base, method, ("policy",), new_tokens=4, reward_pooling="mean")
    res = eval_lib.evaluate(evaluator, base.params, {"reference": None, "policy": delta}, ids,
                            mask, jax.random.key(0), classifier_score=lambda t: np.array(
                                [float(len(x) > 0) for x in t]), reward=reward, chunk=2)
    assert set(res) == {"reference", "policy"}
    assert abs(res["reference"]["kl_per_token"]) < 1e-6 and res["policy"]["kl_per_token"] > 1e-3
    assert res["reference"]["positive"] == 1.0 and len(res["policy"]["samples"]) == 3
    assert all(s.startswith(p) for s, p in zip(res["reference"]["samples"],
                                               ["the film is ", "bad ", "a "]))
    assert np.isfinite(res["policy"]["reward"])
