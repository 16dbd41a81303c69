"""DPO (and IPO) on the preference pairs, with the reference = the base without a delta.

The policy is ``base + LoRA``; the reference is the same ``params`` run without a delta -- no
second copy of the model. The reference never changes, so its log-probabilities of the fixed
pairs are computed once before training (:func:`reference_logps`; TRL's
``precompute_ref_log_probs``). Per pair, with ``lp`` the summed log-probability of the completion
tokens (:func:`jpeft.rlhf.losses.sequence_logprobs` over the response; for IPO its per-token
average, as TRL length-normalises IPO)::

    h    = (lp_policy(chosen) - lp_ref(chosen)) - (lp_policy(rejected) - lp_ref(rejected))
    DPO  = -log sigmoid(beta * h)             IPO = (h - 1 / (2 beta))^2

(:func:`jpeft.rlhf.losses.dpo_loss`), averaged over the batch. At a zero delta ``h = 0`` and the
DPO loss is ``log 2``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.core import method as method_lib
from jpeft.rlhf import losses, models
from jpeft.rlhf.preferences import Pairs


class DPOConfig(NamedTuple):
    """DPO's settings: ``beta``, ``loss_type`` (``"sigmoid"`` or ``"ipo"``), ``steps`` of
    ``batch`` pairs at ``lr`` (warm-up + cosine), ``seed`` of the batch draws."""
    beta: float = 0.1
    loss_type: str = "sigmoid"
    steps: int = 70
    batch: int = 32
    lr: float = 1e-3
    seed: int = 3


def batch_of(pairs: Pairs, idx: Any, ref: tuple[np.ndarray, np.ndarray]) -> dict:
    """The pairs at ``idx`` with their completion masks and reference log-probs: ``{"chosen",
    "chosen_mask", "chosen_completion", "rejected", ..., "ref_chosen", "ref_rejected"}``."""
    return {"chosen": pairs.chosen[idx], "chosen_mask": pairs.chosen_mask[idx],
            "chosen_completion": pairs.completion_mask(pairs.chosen_mask[idx]),
            "rejected": pairs.rejected[idx], "rejected_mask": pairs.rejected_mask[idx],
            "rejected_completion": pairs.completion_mask(pairs.rejected_mask[idx]),
            "ref_chosen": ref[0][idx], "ref_rejected": ref[1][idx]}


def completion_logps(base: models.Base, method: method_lib.Method | None, params: Any,
                     delta: Any, batch: dict, *, average: bool) -> tuple[jax.Array, jax.Array]:
    """``(chosen [b], rejected [b])`` log-probabilities of the completions under ``base + delta``
    (``method=None``: the base), in one forward pass of ``2b`` rows."""
    ids = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    completion = jnp.concatenate([batch["chosen_completion"], batch["rejected_completion"]])
    logits, _ = models.run(base, method, params, delta, ids, mask)
    lp = losses.sequence_logprobs(logits, ids, completion, average=average)
    b = batch["chosen"].shape[0]
    return lp[:b], lp[b:]


def loss_of(base: models.Base, method: method_lib.Method, config: DPOConfig, params: Any,
            delta: Any, batch: dict) -> tuple[jax.Array, dict]:
    """The mean DPO/IPO loss of a batch (:func:`batch_of`) and its metrics (``accuracy``: the
    fraction of pairs whose implicit reward ranks chosen first; ``margin``: mean
    ``chosen_reward - rejected_reward``)."""
    chosen, rejected = completion_logps(base, method, params, delta, batch,
                                        average=config.loss_type == "ipo")
    loss, r_chosen, r_rejected = losses.dpo_loss(
        chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], beta=config.beta,
        loss_type=config.loss_type)
    return jnp.mean(loss), {"accuracy": jnp.mean((r_chosen > r_rejected).astype(jnp.float32)),
                            "margin": jnp.mean(r_chosen - r_rejected)}


def reference_logps(base: models.Base, pairs: Pairs, *, average: bool = False,
                    batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The reference's (the base's, no delta) completion log-probs of every pair: ``([N],
    [N])``, computed once (batches of ``batch``; the last one padded)."""
    f = jax.jit(lambda p, b: completion_logps(base, None, p, None, b, average=average))
    zeros = (np.zeros(len(pairs), np.float32),) * 2
    out_c, out_r = [], []
    for start in range(0, len(pairs), batch):
        rows = np.arange(start, min(start + batch, len(pairs)))
        idx = np.concatenate([rows, np.full(batch - len(rows), rows[0])])
        c, r = f(base.params, batch_of(pairs, idx, zeros))
        out_c.append(np.asarray(c)[:len(rows)])
        out_r.append(np.asarray(r)[:len(rows)])
    return np.concatenate(out_c), np.concatenate(out_r)


class Fit(NamedTuple):
    """The trained policy delta and each step's loss and implicit-reward accuracy."""
    delta: Any
    losses: list[float]
    accuracies: list[float]


def train(base: models.Base, method: method_lib.Method, delta: Any, pairs: Pairs,
          config: DPOConfig = DPOConfig()) -> Fit:
    """``config.steps`` AdamW steps of :func:`loss_of` on batches drawn with replacement."""
    ref = reference_logps(base, pairs, average=config.loss_type == "ipo")
    steps = config.steps
    schedule = (optax.constant_schedule(config.lr) if steps < 2 else
                optax.warmup_cosine_decay_schedule(0.0, config.lr, max(1, steps // 10), steps))
    opt = optax.adamw(schedule, weight_decay=0.0)
    step = jpeft.make_train_step(lambda p, d, b, k: loss_of(base, method, config, p, d, b), opt,
                                 method=method)
    state = jpeft.init_opt_state(opt, delta, method=method)
    delta, state = models.placed((delta, state), base.params)
    rng = np.random.default_rng(config.seed)
    out, acc = [], []
    for i in range(steps):
        idx = rng.integers(0, len(pairs), min(config.batch, len(pairs)))
        delta, state, metrics = step(base.params, delta, state, batch_of(pairs, idx, ref),
                                     jax.random.key(i))
        out.append(metrics["loss"])
        acc.append(metrics["accuracy"])
    return Fit(delta, [float(x) for x in out], [float(x) for x in acc])


__all__ = ["DPOConfig", "Fit", "batch_of", "completion_logps", "loss_of", "reference_logps",
           "train"]
