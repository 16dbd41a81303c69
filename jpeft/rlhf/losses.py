"""RLHF losses as small pure functions: DPO/IPO, the pairwise reward-model loss and PPO's pieces.

Each function is the math TRL uses (the docstrings name the TRL code it follows), written for JAX:
arrays in, arrays out, no state, every function ``jax.jit``-compatible (string options are Python
values: close over them or mark them static). Arguments are checked in Python before anything is
traced, so a wrong option or shape raises a ``ValueError`` at the call, not an XLA error later.

Conventions:

* ``B`` is the batch, ``T`` the sequence (or response) length, ``V`` the vocabulary.
* A ``mask`` is ``[B, T]``, bool or 0/1 numbers; 1 marks a real token. Padded positions never change
  a result: they are selected out (``jnp.where``), not multiplied by zero, so in the PPO functions
  and :func:`masked_mean` padding that holds ``inf``/``NaN`` leaks into neither a value nor a
  gradient (the logits given to :func:`token_logprobs` must be finite everywhere, as a model's are).
* Next-token shift: ``logits[:, t]`` score ``tokens[:, t + 1]`` (a causal LM's output at position
  ``t`` is its prediction of the token after it). A mask over ``tokens`` marks the tokens to score;
  ``mask[:, 0]`` is never used (nothing predicts the first token).

A PPO step in the order of TRL's ``PPOTrainer.train``, with ``m`` the response mask::

    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, m, kl_coef=0.05)
    advantages, returns = gae(rewards, values, m, gamma=1.0, lam=0.95)
    advantages = whiten(advantages, m)
    pg_loss, pg_clipfrac, approx_kl = ppo_policy_loss(new_logprobs, logprobs, advantages, m, 0.2)
    vf_loss, vf_clipfrac = ppo_value_loss(new_values, values, returns, m, 0.2)
    loss = pg_loss + 0.1 * vf_loss

(TRL's own placement of the score, one slot after the last token, is ``score_at="after_last"``
together with :func:`extend_mask` for the value mask; see :func:`kl_penalized_rewards`.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "masked_mean",
    "token_logprobs",
    "sequence_logprobs",
    "dpo_loss",
    "reward_pair_loss",
    "kl_penalized_rewards",
    "extend_mask",
    "gae",
    "whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo")
KL_ESTIMATORS = ("k1", "k3")
SCORE_POSITIONS = ("last", "after_last")


# --- argument checks (Python, before tracing) --------------------------------------------------


def _shape(name: str, x: Any) -> tuple[int, ...]:
    try:
        return tuple(jnp.shape(x))
    except TypeError as e:
        raise ValueError(f"{name} must be an array, got {type(x).__name__}") from e


def _same_shape(**arrays: Any) -> tuple[int, ...]:
    shapes = {name: _shape(name, x) for name, x in arrays.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()):
        listed = ", ".join(f"{name} {s}" for name, s in shapes.items())
        raise ValueError(f"shape mismatch: {listed} must all have the same shape")
    return first


def _ndim(name: str, shape: tuple[int, ...], ndim: int, what: str) -> None:
    if len(shape) != ndim:
        raise ValueError(f"{name} must be {what} ({ndim}-D), got shape {shape}")


def _concrete(x: Any) -> float | None:
    """``float(x)`` for a Python or concrete number; ``None`` for a traced value (not checkable)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return float(x)
    except (TypeError, ValueError) as e:
        raise ValueError(f"expected a scalar number, got {x!r}") from e


def _check_range(name: str, x: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    v = _concrete(x)
    if v is None:
        return
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {v}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")


def _bool_mask(mask: jax.Array) -> jax.Array:
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def _float_dtype(*xs: Any) -> Any:
    dtype = jnp.result_type(*xs)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


# --- shared helpers ----------------------------------------------------------------------------


def masked_mean(
    x: jax.Array, mask: jax.Array, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """Mean of ``x`` over the positions where ``mask`` is non-zero: ``sum(x * m) / sum(m)``.

    ``mask`` broadcasts against ``x``; a numeric mask weights the positions (as TRL's
    ``masked_mean``), a bool mask selects them. ``axis=None`` reduces over everything (a scalar).
    Masked-out positions are selected out before the sum, so ``inf``/``NaN`` there do not leak. An
    all-zero mask gives ``NaN`` (``0 / 0``), as in TRL.
    """
    x = jnp.asarray(x)
    m = jnp.asarray(mask)
    dtype = _float_dtype(x)
    weight = m.astype(dtype)
    total = jnp.sum(jnp.where(m != 0, x.astype(dtype) * weight, 0), axis=axis)
    count = jnp.sum(jnp.broadcast_to(weight, jnp.broadcast_shapes(x.shape, m.shape)), axis=axis)
    return total / count


def token_logprobs(
    logits: jax.Array, tokens: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Log-probability of each next token: ``[B, T, V], [B, T] -> [B, T - 1]``.

    ``out[:, t] = log_softmax(logits[:, t])[tokens[:, t + 1]]`` -- the logits at position ``t``
    score the token at ``t + 1`` (TRL: ``selective_log_softmax(logits[:, :-1], input_ids[:, 1:])``,
    and the per-token ``log_probs`` of its fused LM head). With ``mask [B, T]`` (over ``tokens``)
    the entries whose scored token is masked out (``mask[:, t + 1] == 0``) are 0, as TRL's fused
    head returns them for labels ``-100``. Computed in at least float32.
    """
    ls, ts = _shape("logits", logits), _shape("tokens", tokens)
    _ndim("logits", ls, 3, "[B, T, V]")
    if ts != ls[:2]:
        raise ValueError(f"shape mismatch: logits {ls} and tokens {ts} (expected {ls[:2]})")
    if mask is not None and _shape("mask", mask) != ts:
        raise ValueError(f"shape mismatch: tokens {ts} and mask {_shape('mask', mask)}")
    logits = jnp.asarray(logits)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    out = jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None].astype(jnp.int32), axis=-1)
    out = out[..., 0]
    if mask is not None:
        out = jnp.where(_bool_mask(mask)[:, 1:], out, 0)
    return out


def sequence_logprobs(
    logits: jax.Array, tokens: jax.Array, mask: jax.Array, *, average: bool = False
) -> jax.Array:
    """Summed log-probability of the masked tokens of each sequence: ``[B, T, V], [B, T], [B, T] ->
    [B]``.

    ``out[b] = sum_{t >= 1} mask[b, t] * log p(tokens[b, t] | tokens[b, :t])``, with the
    probability read from ``logits[b, t - 1]`` (:func:`token_logprobs`). ``mask`` is over
    ``tokens`` -- for DPO, TRL's ``completion_mask`` (1 on the completion tokens, 0 on the prompt
    and padding); its first column is never used. This is TRL's DPO ``logps``
    (``per_token_logps.sum(dim=1)`` over the completion labels).

    ``average=True`` divides by the number of scored tokens, ``max(sum_{t >= 1} mask[b, t], 1)``:
    the per-token average TRL's IPO uses (see :func:`dpo_loss`).
    """
    per_token = token_logprobs(logits, tokens, mask)
    total = jnp.sum(per_token, axis=-1)
    if average:
        count = jnp.sum(_bool_mask(mask)[:, 1:], axis=-1).astype(total.dtype)
        total = total / jnp.maximum(count, 1)
    return total


# --- preference losses -------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | jax.Array = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DPO / IPO loss per pair, and the implicit rewards: four ``[B]`` -> ``(loss, chosen_rewards,
    rejected_rewards)``, each ``[B]`` (take ``loss.mean()`` for TRL's batch loss).

    With the log-ratios ``c = policy_chosen - ref_chosen`` and ``r = policy_rejected -
    ref_rejected`` and ``h = c - r``:

    * ``"sigmoid"`` (DPO): ``-(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)``,
      with ``eps = label_smoothing`` (conservative DPO). At ``eps = 0`` this is TRL 1.x's
      ``loss_type="sigmoid"`` (``DPOTrainer._compute_loss``); TRL 1.x no longer applies
      ``label_smoothing`` to ``"sigmoid"`` (only to ``"robust"``, ``"exo_pair"``, ``"aot"``); the
      ``eps > 0`` form is TRL 0.x's ``DPOTrainer.dpo_loss`` for ``"sigmoid"``.
    * ``"ipo"``: ``(h - 1 / (2 * beta)) ** 2`` (IPO paper, eq. 17; ``beta`` is its ``tau``).
      TRL length-normalises for IPO: it divides each sequence's log-ratio by its number of
      completion tokens (TRL 1.x inside ``_compute_loss``; TRL 0.x on the log-probs, in
      ``concatenated_forward``). Here the **caller** does it: pass per-token averages, e.g.
      :func:`sequence_logprobs` with ``average=True`` for the four inputs. ``label_smoothing``
      must be 0.

    ``chosen_rewards = beta * c`` and ``rejected_rewards = beta * r``, without gradient (TRL's
    logged ``rewards/chosen`` / ``rewards/rejected``; for IPO they are computed from whatever
    log-probs are passed, so from the averages when the caller averages, as in TRL 0.x -- TRL 1.x
    logs them from the token sums).

    ``beta`` and ``label_smoothing`` may be traced; ``loss_type`` is a Python string (static under
    ``jax.jit``). Raises ``ValueError`` for an unknown ``loss_type``, inputs of different shapes or
    not 1-D, ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5)``, or a non-zero
    ``label_smoothing`` with ``"ipo"``.
    """
    _check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    shape = _same_shape(policy_chosen_logps=policy_chosen_logps,
                        policy_rejected_logps=policy_rejected_logps,
                        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    _ndim("policy_chosen_logps", shape, 1, "[B]")
    _check_range("beta", beta, 0.0, float("inf"), lo_open=True, hi_open=True)
    _check_range("label_smoothing", label_smoothing, 0.0, 0.5, lo_open=False, hi_open=True)
    if loss_type == "ipo" and _concrete(label_smoothing) not in (None, 0.0):
        raise ValueError(
            "label_smoothing applies to loss_type='sigmoid' only; it must be 0 for 'ipo'")

    chosen_logratios = jnp.asarray(policy_chosen_logps) - jnp.asarray(ref_chosen_logps)
    rejected_logratios = jnp.asarray(policy_rejected_logps) - jnp.asarray(ref_rejected_logps)
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        eps = label_smoothing
        loss = -(1 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    else:  # ipo
        loss = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
    return loss, chosen_rewards, rejected_rewards


def reward_pair_loss(
    chosen_scores: jax.Array,
    rejected_scores: jax.Array,
    margin: jax.Array | float | None = None,
    *,
    center_rewards_coefficient: float | None = None,
) -> jax.Array:
    """Pairwise (Bradley-Terry) reward-model loss: ``[B], [B] -> scalar``.

    ``mean(-log_sigmoid(chosen - rejected - margin))`` (no margin term when ``margin`` is None;
    ``margin`` is ``[B]`` or a scalar), plus ``center_rewards_coefficient * mean((chosen +
    rejected) ** 2)`` when that is given -- TRL's ``RewardTrainer.compute_loss``. The scores are the
    reward head's outputs, one per sequence (squeeze a trailing ``1``).
    """
    shape = _same_shape(chosen_scores=chosen_scores, rejected_scores=rejected_scores)
    _ndim("chosen_scores", shape, 1, "[B]")
    diff = jnp.asarray(chosen_scores) - jnp.asarray(rejected_scores)
    if margin is not None:
        ms = _shape("margin", margin)
        if ms not in ((), shape):
            raise ValueError(f"shape mismatch: margin {ms} must be a scalar or {shape}")
        diff = diff - jnp.asarray(margin)
    loss = -jnp.mean(jax.nn.log_sigmoid(diff))
    if center_rewards_coefficient is not None:
        total = jnp.asarray(chosen_scores) + jnp.asarray(rejected_scores)
        loss = loss + center_rewards_coefficient * jnp.mean(total**2)
    return loss


# --- PPO ---------------------------------------------------------------------------------------


def _last_index(mask: jax.Array) -> jax.Array:
    """Index of each row's last non-zero mask entry, ``-1`` for an empty row: ``[B, T] -> [B]``."""
    t = mask.shape[-1]
    return jnp.max(jnp.where(mask, jnp.arange(t), -1), axis=-1)


def extend_mask(mask: jax.Array) -> jax.Array:
    """``mask`` with one more position after each row's last real token (where the row has room):
    ``[B, T] -> [B, T]`` bool.

    TRL's ``PPOTrainer`` places the score one slot past the response (``score_at="after_last"`` in
    :func:`kl_penalized_rewards`) and trains the value head on that slot too: its
    ``~padding_mask_p1``. Pass this mask to :func:`gae` and :func:`ppo_value_loss` (and the response
    mask to :func:`whiten` and :func:`ppo_policy_loss`) to reproduce TRL exactly.
    """
    m = _bool_mask(mask)
    _ndim("mask", m.shape, 2, "[B, T]")
    last = _last_index(m)
    return m | (jnp.arange(m.shape[-1]) == (last + 1)[:, None])


def kl_penalized_rewards(
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    mask: jax.Array,
    kl_coef: float | jax.Array = 0.05,
    kl_estimator: str = "k1",
    *,
    score_at: str = "last",
) -> jax.Array:
    """Per-token PPO rewards: a KL penalty on every response token plus the sequence's score on one
    token. ``scores [B]``, ``logprobs, ref_logprobs, mask [B, T] -> rewards [B, T]``.

    With ``log_r = ref_logprobs - logprobs`` (log-probs of the sampled response tokens under the
    reference and the policy) and the estimators of Schulman's "Approximating KL divergence":

    * ``"k1"``: ``kl = -log_r``;  ``"k3"``: ``kl = exp(log_r) - 1 - log_r``,

    ``rewards = -kl_coef * kl`` on the masked tokens (0 elsewhere), and ``scores[b]`` is added at:

    * ``score_at="last"`` (default): the last real token of row ``b`` (the last position where
      ``mask`` is 1; a row with an empty mask gets no score);
    * ``score_at="after_last"``: TRL's ``PPOTrainer`` placement -- the slot after the last real
      token, or the last real token when the response fills all ``T`` positions (an empty row: slot
      0). That slot is outside ``mask``; use :func:`extend_mask` as the mask of :func:`gae` and
      :func:`ppo_value_loss` to keep it, as TRL does.

    This is step 4 of TRL's ``PPOTrainer.train`` (``trl/experimental/ppo/ppo_trainer.py``), whose
    log-probs are ``INVALID_LOGPROB`` on padding, so its KL there is 0 -- here the mask does that.
    ``kl_coef`` may be traced; ``kl_estimator`` and ``score_at`` are Python strings.
    """
    _check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _check_choice("score_at", score_at, SCORE_POSITIONS)
    shape = _same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    _ndim("logprobs", shape, 2, "[B, T]")
    if _shape("scores", scores) != shape[:1]:
        raise ValueError(f"shape mismatch: scores {_shape('scores', scores)} must be {shape[:1]}")
    _check_range("kl_coef", kl_coef, 0.0, float("inf"), lo_open=False, hi_open=True)

    m = _bool_mask(mask)
    logprobs, ref_logprobs = jnp.asarray(logprobs), jnp.asarray(ref_logprobs)
    log_r = jnp.where(m, ref_logprobs - logprobs, 0)
    kl = -log_r if kl_estimator == "k1" else jnp.expm1(log_r) - log_r
    rewards = jnp.where(m, -kl_coef * kl, 0)

    t = shape[1]
    last = _last_index(m)
    if score_at == "last":
        at = last  # -1 (no score) for an empty row
    else:
        at = jnp.minimum(last + 1, t - 1)
    hit = jnp.arange(t) == at[:, None]
    return rewards + jnp.where(hit, jnp.asarray(scores, rewards.dtype)[:, None], 0)


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float | jax.Array = 1.0,
    lam: float | jax.Array = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over each row: ``rewards, values, mask [B, T] ->
    (advantages, returns)``, both ``[B, T]`` and 0 where ``mask`` is 0.

    With ``r`` and ``v`` the rewards and values set to 0 outside the mask and ``v[:, T] = 0``::

        delta_t = r_t + gamma * v_{t+1} - v_t
        A_t     = delta_t + gamma * lam * A_{t+1}      (A_T = 0; A_t = 0 where mask_t = 0)
        returns = A + v

    a ``jax.lax.scan`` backwards over ``T``. ``mask`` is a right-padded prefix per row, as a
    response's (a 0 inside a row ends the episode there: no value is bootstrapped across it). The
    advantages are not whitened; see :func:`whiten`.

    TRL's ``PPOTrainer.train`` (step 6) runs the same recursion over all ``T`` positions without a
    mask, relying on its rewards and values being 0 past the value mask (``padding_mask_p1``);
    zeroing them here gives the same numbers for its masks and keeps padding from mattering.
    """
    shape = _same_shape(rewards=rewards, values=values, mask=mask)
    _ndim("rewards", shape, 2, "[B, T]")
    _check_range("gamma", gamma, 0.0, 1.0, lo_open=False, hi_open=False)
    _check_range("lam", lam, 0.0, 1.0, lo_open=False, hi_open=False)

    m = _bool_mask(mask)
    dtype = _float_dtype(rewards, values)
    r = jnp.where(m, jnp.asarray(rewards, dtype), 0)
    v = jnp.where(m, jnp.asarray(values, dtype), 0)
    next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    delta = r + gamma * next_v - v

    def step(carry, xs):
        d, keep = xs
        a = jnp.where(keep, d + gamma * lam * carry, 0)
        return a, a

    _, adv_t = jax.lax.scan(step, jnp.zeros(shape[:1], dtype), (delta.T, m.T), reverse=True)
    advantages = adv_t.T
    return advantages, jnp.where(m, advantages + v, 0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True) -> jax.Array:
    """Masked whitening over all masked entries: ``x, mask [B, T] -> [B, T]`` (any shape works).

    ``(x - mu) / sqrt(var + 1e-8)``, plus ``mu`` again when ``shift_mean=False``, where ``mu`` is
    the masked mean and ``var`` the masked variance with Bessel's correction ``n / (n - 1)``
    (``n = sum(mask)``) -- TRL's ``masked_whiten`` / ``masked_var(unbiased=True)``. Positions
    outside the mask are 0 in the output (TRL fills them with 0 right after each call). ``n`` must
    be at least 2 (TRL raises for ``n = 0``; ``n = 1`` divides by zero in both).
    """
    _same_shape(x=x, mask=mask)
    m = _bool_mask(mask)
    x = jnp.asarray(x)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    n = jnp.sum(m).astype(var.dtype)
    var = var * n / (n - 1)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return jnp.where(m, out, 0)


def ppo_policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_range: float | jax.Array = 0.2,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PPO's clipped surrogate: ``[B, T]`` each -> ``(loss, clipfrac, approx_kl)``, scalars.

    With ``ratio = exp(logprobs - old_logprobs)`` and ``c = clip_range``::

        loss      = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)))
        clipfrac  = masked_mean(-A * clip(ratio, ...) > -A * ratio)
        approx_kl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2)

    (TRL's ``PPOTrainer.train``: ``pg_loss``, ``pg_clipfrac``, ``approxkl``), over the response
    mask. ``clipfrac`` and ``approx_kl`` carry no gradient. ``approx_kl`` differs from TRL's on
    purpose: TRL averages over all ``B * T`` positions (the log-prob difference is 0 on its
    padding), which makes it depend on the padding; its value is ``approx_kl * sum(mask) / (B *
    T)``.
    """
    shape = _same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
                        mask=mask)
    _ndim("logprobs", shape, 2, "[B, T]")
    _check_range("clip_range", clip_range, 0.0, float("inf"), lo_open=True, hi_open=True)
    m = _bool_mask(mask)
    diff = jnp.where(m, jnp.asarray(logprobs) - jnp.asarray(old_logprobs), 0)
    adv = jnp.where(m, jnp.asarray(advantages), 0)
    ratio = jnp.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(jnp.maximum(unclipped, clipped), m)
    clipfrac = masked_mean((clipped > unclipped).astype(loss.dtype), m)
    approx_kl = 0.5 * masked_mean(diff**2, m)
    return loss, jax.lax.stop_gradient(clipfrac), jax.lax.stop_gradient(approx_kl)


def ppo_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_range_value: float | jax.Array = 0.2,
) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped value loss: ``[B, T]`` each -> ``(loss, clipfrac)``, scalars.

    With ``v_clip = clip(values, old_values - c, old_values + c)`` and ``c = clip_range_value``::

        loss     = 0.5 * masked_mean(max((values - returns) ** 2, (v_clip - returns) ** 2))
        clipfrac = masked_mean((v_clip - returns) ** 2 > (values - returns) ** 2)

    (TRL's ``PPOTrainer.train``: ``vf_loss``, ``vf_clipfrac``; TRL's mask here is the value mask,
    :func:`extend_mask` of the response mask). ``clipfrac`` carries no gradient.
    """
    shape = _same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    _ndim("values", shape, 2, "[B, T]")
    _check_range("clip_range_value", clip_range_value, 0.0, float("inf"), lo_open=True,
                 hi_open=True)
    m = _bool_mask(mask)
    v = jnp.where(m, jnp.asarray(values), 0)
    old = jnp.where(m, jnp.asarray(old_values), 0)
    ret = jnp.where(m, jnp.asarray(returns), 0)
    v_clip = jnp.clip(v, old - clip_range_value, old + clip_range_value)
    unclipped = (v - ret) ** 2
    clipped = (v_clip - ret) ** 2
    loss = 0.5 * masked_mean(jnp.maximum(unclipped, clipped), m)
    clipfrac = masked_mean((clipped > unclipped).astype(loss.dtype), m)
    return loss, jax.lax.stop_gradient(clipfrac)
