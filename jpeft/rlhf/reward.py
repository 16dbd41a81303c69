"""Step 2 of DeepSpeed-Chat as PEFT: the reward model = the base + its own LoRA + a scalar head.

``score(x) = head(hidden_{base + LoRA}(x)[last real token])`` (:func:`jpeft.rlhf.models.
sequence_scores`; or the head's mean over the real tokens, ``pooling="mean"``), trained on
preference pairs with the pairwise (Bradley-Terry) loss
:func:`jpeft.rlhf.losses.reward_pair_loss`::

    loss = mean_b -log sigmoid(score(chosen_b) - score(rejected_b))

The delta is ``{"lora": ..., "head": {"kernel": [H, 1], "bias": [1]}}``; the base is frozen and
shared (the same ``params`` the actor, critic and reference run on). One step scores the chosen
and the rejected sequences of a batch in one forward pass of ``2b`` rows.
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


def pair_loss(base: models.Base, method: method_lib.Method, params: Any, delta: dict,
              batch: dict, pooling: str = "last") -> tuple[jax.Array, dict]:
    """The reward model's loss on a batch of pairs ``{"chosen", "chosen_mask", "rejected",
    "rejected_mask"}`` (each ``[b, T]``; sequence scores by ``pooling``,
    :func:`jpeft.rlhf.models.pooled_scores`) and its metrics (``accuracy``: the fraction of pairs
    scored in the right order; ``margin``: mean ``chosen - rejected``)."""
    ids = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    scores = models.sequence_scores(base, method, params, delta, ids, mask, pooling)
    b = batch["chosen"].shape[0]
    chosen, rejected = scores[:b], scores[b:]
    loss = losses.reward_pair_loss(chosen, rejected)
    return loss, {"accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)),
                  "margin": jnp.mean(chosen - rejected)}


def batch_of(pairs: Pairs, idx: Any) -> dict:
    """``{"chosen", "chosen_mask", "rejected", "rejected_mask"}`` of the pairs at ``idx``."""
    return {"chosen": pairs.chosen[idx], "chosen_mask": pairs.chosen_mask[idx],
            "rejected": pairs.rejected[idx], "rejected_mask": pairs.rejected_mask[idx]}


class Fit(NamedTuple):
    """The trained reward delta and each step's loss and accuracy."""
    delta: dict
    losses: list[float]
    accuracies: list[float]


def train(base: models.Base, method: method_lib.Method, delta: dict, pairs: Pairs, *,
          steps: int, batch: int = 32, lr: float = 3e-3, head_lr: float | None = None,
          seed: int = 2, pooling: str = "last") -> Fit:
    """``steps`` AdamW steps (warm-up + cosine; ``head_lr`` for the head, default ``lr``) of
    :func:`pair_loss` on batches of ``batch`` pairs drawn with replacement (seeded)."""
    sched = lambda peak: (optax.constant_schedule(peak) if steps < 2 else
                          optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 10),
                                                             steps))
    opt = optax.multi_transform(
        {"lora": optax.adamw(sched(lr), weight_decay=0.0),
         "head": optax.adamw(sched(head_lr or lr), weight_decay=0.0)},
        lambda d: {"lora": jax.tree.map(lambda _: "lora", d["lora"]),
                   "head": jax.tree.map(lambda _: "head", d["head"])})
    step = jpeft.make_train_step(lambda p, d, b, k: pair_loss(base, method, p, d, b, pooling),
                                 opt)
    state = jpeft.init_opt_state(opt, delta)
    delta, state = models.placed((delta, state), base.params)
    rng = np.random.default_rng(seed)
    out, acc = [], []
    for i in range(steps):
        idx = rng.integers(0, len(pairs), min(batch, len(pairs)))
        delta, state, metrics = step(base.params, delta, state, batch_of(pairs, idx),
                                     jax.random.key(i))
        out.append(metrics["loss"])
        acc.append(metrics["accuracy"])
    return Fit(delta, [float(x) for x in out], [float(x) for x in acc])


def evaluate(base: models.Base, method: method_lib.Method, delta: dict, pairs: Pairs, *,
             batch: int = 64, pooling: str = "last") -> dict:
    """Mean loss and pair accuracy of the reward model on ``pairs`` (batches of ``batch``)."""
    f = jax.jit(lambda p, d, b: pair_loss(base, method, p, d, b, pooling))
    total, correct, n = 0.0, 0.0, 0
    for start in range(0, len(pairs), batch):
        idx = np.arange(start, min(start + batch, len(pairs)))
        loss, m = f(base.params, delta, batch_of(pairs, idx))
        total += float(loss) * len(idx)
        correct += float(m["accuracy"]) * len(idx)
        n += len(idx)
    return {"loss": total / max(n, 1), "accuracy": correct / max(n, 1), "pairs": n}


__all__ = ["Fit", "batch_of", "evaluate", "pair_loss", "train"]
