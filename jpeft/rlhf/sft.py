"""Step 1 of DeepSpeed-Chat as PEFT: supervised fine-tuning of a LoRA on the base decoder.

No pretrained decoder ships with jpeft, so the base is made as the decoder example makes it
(:mod:`jpeft.recipes.decoder`): the byte-level LLaMA trained in full on the *negative* movie-review
sentences (:func:`pretrain`). SFT then trains a LoRA (:func:`jpeft.rlhf.models.adapter`) on the
*positive* sentences with the causal-LM loss (:func:`lm_loss`), the base frozen (:func:`train`).

For the later steps the SFT LoRA is merged into the base once (:func:`merged`): that merged tree
is *the* base of RLHF -- the reference model of PPO and DPO (DeepSpeed-Chat's reference is the
SFT model) and the starting point of the actor, critic and reward deltas. One tree, as before.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.core import method as method_lib
from jpeft.rlhf import models


def lm_loss(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean next-byte cross-entropy over the real tokens: ``logits [B, T, V], ids, mask [B, T] ->
    scalar``, ``sum_{t >= 1} mask[:, t] * CE(logits[:, t - 1], ids[:, t]) / sum_{t >= 1} mask[:,
    t]``."""
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:])
    w = mask[:, 1:].astype(nll.dtype)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


class Fit(NamedTuple):
    """A training run's outcome: the delta and the loss of each step."""
    delta: Any
    losses: list[float]


def _fit(loss_of: Callable, params, delta, ids: np.ndarray, mask: np.ndarray, *, steps: int,
         lr: float, batch: int, seed: int, method: method_lib.Method | None = None) -> Fit:
    """AdamW (no weight decay) on a 10% warm-up + cosine schedule, ``steps`` steps of ``batch``
    rows drawn with replacement (seeded)."""
    schedule = (optax.constant_schedule(lr) if steps < 2 else
                optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps))
    opt = optax.adamw(schedule, weight_decay=0.0)
    step = jpeft.make_train_step(
        lambda p, d, b, k: loss_of(p, d, b["ids"], b["mask"]), opt, method=method)
    state = jpeft.init_opt_state(opt, delta, method=method)
    delta, state = models.placed((delta, state), params)
    rng = np.random.default_rng(seed)
    losses = []
    for i in range(steps):
        idx = rng.integers(0, len(ids), batch)
        delta, state, metrics = step(params, delta, state, {"ids": ids[idx], "mask": mask[idx]},
                                     jax.random.key(i))
        losses.append(metrics["loss"])
    return Fit(delta, [float(x) for x in losses])


def pretrain(base: models.Base, ids: np.ndarray, mask: np.ndarray, *, steps: int,
             lr: float = 3e-3, batch: int = 32, seed: int = 0) -> tuple[Any, Fit]:
    """The base decoder: every weight of ``base.params`` trained on ``ids, mask [N, T]``
    (right-padded byte sentences) with :func:`lm_loss` (``jpeft.full_finetune``). Returns the
    trained parameter tree and the fit (whose delta is that tree)."""
    full = jpeft.full_finetune()
    delta = full.init(jax.random.key(seed), base.params)
    f = jpeft.wrap(base.forward, full)
    fit = _fit(lambda p, d, i, m: lm_loss(f(p, d, i, m)[0], i, m), base.params, delta, ids, mask,
               steps=steps, lr=lr, batch=batch, seed=seed)
    return jax.jit(full.merge)(base.params, fit.delta), fit


def train(base: models.Base, method: method_lib.Method, delta: Any, ids: np.ndarray,
          mask: np.ndarray, *, steps: int, lr: float = 5e-3, batch: int = 32,
          seed: int = 1) -> Fit:
    """SFT: ``delta`` (a LoRA of ``method``) trained with :func:`lm_loss` on ``ids, mask [N, T]``,
    the base frozen."""
    loss = lambda p, d, i, m: lm_loss(models.run(base, method, p, d, i, m)[0], i, m)
    return _fit(loss, base.params, delta, ids, mask, steps=steps, lr=lr, batch=batch, seed=seed,
                method=method)


def eval_loss(base: models.Base, method: method_lib.Method | None, delta: Any, ids: np.ndarray,
              mask: np.ndarray) -> float:
    """:func:`lm_loss` of ``base + delta`` (``method=None``: the base) on ``ids, mask``."""
    f = jax.jit(lambda p, d, i, m: lm_loss(models.run(base, method, p, d, i, m)[0], i, m))
    return float(f(base.params, delta, ids, mask))


def merged(base: models.Base, method: method_lib.Method, delta: Any) -> models.Base:
    """``base`` with the SFT LoRA merged into its weights once (``W0 + s A B``): the base of the
    RLHF steps (module docstring). The sites are unchanged (same shapes)."""
    params = jax.jit(lambda p, d: method.merge(p, d, base.sites))(base.params, delta)
    return base._replace(params=params)


__all__ = ["Fit", "eval_loss", "lm_loss", "merged", "pretrain", "train"]
