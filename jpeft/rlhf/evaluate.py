"""Held-out evaluation of policies on one base: mean reward and KL to the reference.

For each named policy (a LoRA delta on the base, or ``None`` for the reference = the base
alone), continuations of the same held-out prompts are sampled (temperature ``T``, a fixed key)
-- **all policies in one generation** (:func:`jpeft.multi.mixed`: each row's adapter picked per
example, ``-1`` for the reference; the base weights are read once per step for every policy;
``benchmarks/rlhf_cost.py``: 0.88x the time of two separate generations on a 25M-parameter
decoder, 1.05x on the example's 107K one) -- and measured by:

* ``positive``: the mean probability of "positive" the sentiment classifier gives prompt +
  continuation (:mod:`jpeft.rlhf.preferences`; the ground truth of the task);
* ``reward``: the mean reward-model score (:func:`jpeft.rlhf.models.sequence_scores`), when a
  reward delta is given;
* ``kl_per_token``: the exact KL divergence of the policy from the reference at each response
  position, averaged over the response tokens of the policy's own samples::

      KL_t = sum_v pi(v | x_<t) (log pi(v | x_<t) - log pi_ref(v | x_<t))     (softmax(logits / T))

  (0 for the reference itself).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import multi
from jpeft.core import method as method_lib
from jpeft.rlhf import generate as gen_lib
from jpeft.rlhf import models


def token_kl(policy_logits: jax.Array, ref_logits: jax.Array, response_mask: jax.Array, *,
             temperature: float = 1.0) -> jax.Array:
    """Per-row mean over the response of the exact per-token KL (module docstring):
    ``logits [B, P + R, V]`` (both), ``response_mask [B, R] -> [B]``."""
    r = response_mask.shape[1]
    t = policy_logits.shape[1]
    sl = slice(t - r - 1, t - 1)                    # the logits that predict the response
    lp = jax.nn.log_softmax(policy_logits[:, sl].astype(jnp.float32) / temperature, axis=-1)
    lq = jax.nn.log_softmax(ref_logits[:, sl].astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)                          # [B, R]
    m = response_mask.astype(jnp.float32)
    return jnp.sum(kl * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class Evaluator:
    """Compiled generation and scoring for :func:`evaluate` of the policies ``names`` (a
    :func:`jpeft.multi.mixed` of ``method`` over those with a delta), built once and reused
    (before and after training)."""

    def __init__(self, base: models.Base, method: method_lib.Method, names: Sequence[str], *,
                 new_tokens: int, temperature: float = 1.0, reward_pooling: str = "last"):
        self.base, self.method, self.names = base, method, tuple(names)
        self.temperature = temperature
        self.mixed = multi.mixed(**{n: method for n in self.names})
        self.generate = gen_lib.make_generator(base, self.mixed, new_tokens=new_tokens,
                                               temperature=temperature)

        def kl(params, deltas, rollout, index):
            pol, _ = models.run(base, self.mixed, params, deltas, rollout.tokens, rollout.mask,
                                index=index)
            ref, _ = models.run(base, None, params, None, rollout.tokens, rollout.mask)
            return token_kl(pol, ref, rollout.response_mask, temperature=temperature)
        self.kl = jax.jit(kl)
        self.scores = jax.jit(lambda p, d, ro: models.sequence_scores(
            base, method, p, d, ro.tokens, ro.mask, reward_pooling))


def evaluate(evaluator: Evaluator, params: Any, policies: Mapping[str, Any], ids: np.ndarray,
             mask: np.ndarray, key: jax.Array, *,
             classifier_score: Callable[[list[str]], np.ndarray] | None = None,
             reward: dict | None = None, chunk: int = 64, samples: int = 3) -> dict:
    """``{name: {"positive", "reward", "kl_per_token", "samples"}}`` for each policy of
    ``policies`` (``{name: LoRA delta or None}``; names with a delta must be among the
    evaluator's) on the prompts ``ids, mask [N, P]`` (module docstring). The policies' rows are
    generated together, ``chunk`` prompts per policy per call (the last call padded)."""
    names = list(policies)
    unknown = [n for n in names if policies[n] is not None and n not in evaluator.names]
    if unknown:
        raise ValueError(f"evaluate: policies {unknown} are not among the evaluator's "
                         f"{list(evaluator.names)}")
    position = {n: i for i, n in enumerate(evaluator.names)}
    deltas = {n: (policies[n] if policies.get(n) is not None else
                  _zeros_like_adapter(evaluator, params)) for n in evaluator.names}
    k = len(names)
    n_prompts = len(ids)
    out_tokens, out_mask, out_resp, out_kl, out_rows = [], [], [], [], []
    for c, start in enumerate(range(0, n_prompts, chunk)):
        rows = np.arange(start, min(start + chunk, n_prompts))
        idx = np.concatenate([rows, np.full(chunk - len(rows), rows[0])])
        all_ids = np.concatenate([ids[idx]] * k)
        all_mask = np.concatenate([mask[idx]] * k)
        index = np.concatenate([np.full(chunk, position[n] if policies[n] is not None else -1,
                                        np.int32) for n in names])
        rollout = evaluator.generate(params, deltas, all_ids, all_mask,
                                     jax.random.fold_in(key, c), jnp.asarray(index))
        kl = evaluator.kl(params, deltas, rollout, jnp.asarray(index))
        keep = np.concatenate([j * chunk + np.arange(len(rows)) for j in range(k)])
        out_tokens.append(np.asarray(rollout.tokens))
        out_mask.append(np.asarray(rollout.mask))
        out_resp.append(np.asarray(rollout.response_mask))
        out_kl.append(np.asarray(kl))
        out_rows.append((keep, len(rows)))
    results = {}
    for j, name in enumerate(names):
        tok, msk, rsp, kls = [], [], [], []
        for (t, m, r, kl), (_, n) in zip(zip(out_tokens, out_mask, out_resp, out_kl), out_rows):
            sl = slice(j * chunk, j * chunk + n)
            tok.append(t[sl]), msk.append(m[sl]), rsp.append(r[sl]), kls.append(kl[sl])
        rollout = gen_lib.Rollout(np.concatenate(tok), np.concatenate(msk), np.concatenate(rsp))
        texts = gen_lib.texts_of(rollout)
        res = {"kl_per_token": float(np.mean(np.concatenate(kls))),
               "samples": texts[:samples]}
        if classifier_score is not None:
            res["positive"] = float(np.mean(classifier_score(texts)))
        if reward is not None:
            res["reward"] = float(np.mean(_batched_scores(evaluator, params, reward, rollout,
                                                          chunk)))
        results[name] = res
    return results


def _zeros_like_adapter(evaluator: Evaluator, params: Any) -> Any:
    """A zero-effect delta (fresh LoRA init) for an adapter slot no row uses."""
    return evaluator.method.init(jax.random.key(0), params, evaluator.base.sites)


def _batched_scores(evaluator: Evaluator, params: Any, reward: dict, rollout: gen_lib.Rollout,
                    chunk: int) -> np.ndarray:
    out = []
    n = rollout.tokens.shape[0]
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        idx = np.concatenate([rows, np.full(chunk - len(rows), rows[0])])
        part = gen_lib.Rollout(*(np.asarray(x)[idx] for x in rollout))
        out.append(np.asarray(evaluator.scores(params, reward, part))[:len(rows)])
    return np.concatenate(out)


__all__ = ["Evaluator", "evaluate", "token_kl"]
