"""Step 3 of DeepSpeed-Chat as PEFT: PPO with four models on one base.

The models (:mod:`jpeft.rlhf.models`), all on the same ``params``:

* actor = base + actor LoRA (trained), generates the rollouts and gives ``logprobs``;
* reference = the base, no delta, gives ``ref_logprobs``;
* critic = base + critic LoRA + value head (trained), gives ``values``;
* reward = base + reward LoRA + reward head (frozen, from step 2), gives ``scores``.

One iteration (:func:`iteration`), in the order of TRL's ``PPOTrainer.train``, with ``B`` prompts
of ``P`` bytes, ``R`` new tokens and ``m`` the response mask ``[B, R]``:

1. **rollout**: the actor samples ``R`` tokens per prompt by cached generation (one jitted
   program, :func:`jpeft.rlhf.generate.make_generator`);
2. **experience** (:func:`experience_of`, one jitted program): the four models read the rollout,
   in four forward passes of ``B`` rows on the same ``params`` (the default), or with
   ``mixed=True`` in *one* forward pass of ``4B`` rows through :func:`jpeft.multi.mixed` (rows
   ``0..B-1`` the actor, then the reference (``index -1``), the critic, the reward model), the
   base weights read once for all four. Mixed runs every adapter's low-rank path on every row
   (``3 x 4B`` rows of LoRA instead of ``3 x B``) and computes logits for all ``4B`` rows, so it
   pays only where reading the weights dominates; ``benchmarks/rlhf_cost.py`` measured it 1.25x
   slower than four passes on its 25M-parameter decoder and 1.2x on the example's 107K one
   (B = 8, 48 tokens, 2 loaded CPU cores). Then::

       logprobs[b, i]  = log pi_actor(token_{P+i} | tokens_{<P+i}) (logits / temperature)
       values[b, i]    = V_critic(tokens_{<P+i})  (the value head at position P + i - 1)
       scores[b]       = r(tokens)                (the reward head at the last real token, or
                                                  its mean over the tokens: reward_pooling)
       rewards         = kl_penalized_rewards(scores, logprobs, ref_logprobs, m, kl_coef)
                       = -kl_coef * (logprobs - ref_logprobs) + scores at the last token
       advantages, returns = gae(rewards, values, m, gamma, lam)
       advantages          = whiten(advantages, m)

3. **PPO epochs**: ``ppo_epochs`` passes over the experience (in ``minibatches`` shuffled
   minibatches), each a jitted :func:`jpeft.make_train_step` step of::

       loss = ppo_policy_loss(new_logprobs, logprobs, advantages, m, clip_range)       (clipped)
            + vf_coef * ppo_value_loss(new_values, values, returns, m, clip_range_value) (clipped)

   with gradients for the actor LoRA and the critic's LoRA and head only (global-norm clipped,
   then AdamW). The base and the reward delta are inputs, never outputs.

Every loss term is :mod:`jpeft.rlhf.losses`'s.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft import multi
from jpeft.core import method as method_lib
from jpeft.rlhf import generate as gen_lib
from jpeft.rlhf import losses, models

#: The rows of the mixed scoring pass, in order (``-1``: the reference, the base alone).
SCORING_ORDER = ("actor", "reference", "critic", "reward")


class PPOConfig(NamedTuple):
    """PPO's settings (TRL's names and defaults where TRL has them)."""
    new_tokens: int = 24
    temperature: float = 1.0
    ppo_epochs: int = 4
    minibatches: int = 1
    lr: float = 1e-3
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    mixed: bool = False
    reward_pooling: str = "last"


class Experience(NamedTuple):
    """What one rollout yields: ``tokens, mask [B, P + R]``, ``response_mask [B, R]`` and, over
    the response, ``logprobs`` (actor), ``ref_logprobs`` (reference), ``values`` (critic),
    ``rewards``, ``advantages`` (whitened), ``returns`` ``[B, R]``; ``scores [B]`` (reward
    model)."""
    tokens: jax.Array
    mask: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array
    scores: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array


class PPOState(NamedTuple):
    """The trained deltas ``{"actor": LoRA, "critic": {"lora": LoRA, "head": head}}`` and their
    optimizer state."""
    trainable: dict
    opt_state: Any


class PPO(NamedTuple):
    """PPO's compiled pieces on one base: ``generate(params, actor, ids, mask, key) -> Rollout``,
    ``experience(params, trainable, reward, rollout) -> Experience`` and ``step(params,
    trainable, opt_state, experience, key) -> (trainable, opt_state, metrics)`` (a
    :class:`jpeft.TrainStep`, trainable and optimizer state donated)."""
    config: PPOConfig
    base: models.Base
    method: method_lib.Method
    optimizer: optax.GradientTransformation
    generate: Any
    experience: Any
    step: Any


# --------------------------------------------------------------------------------------------
# Pieces


def response_logprobs(logits: jax.Array, tokens: jax.Array, mask: jax.Array, response_length: int,
                      temperature: float = 1.0) -> jax.Array:
    """Log-probabilities of the response tokens: ``logits [B, P + R, V], tokens, mask [B, P + R]
    -> [B, R]`` (the logits at ``P - 1 .. P + R - 2`` score tokens ``P .. P + R - 1``; logits
    divided by ``temperature``, as TRL does; 0 where the mask is 0)."""
    lp = losses.token_logprobs(logits / temperature, tokens, mask)          # [B, P + R - 1]
    return lp[:, lp.shape[1] - response_length:]


def response_values(values: jax.Array, response_length: int) -> jax.Array:
    """The critic's value of the state before each response token: ``[B, P + R] -> [B, R]``
    (positions ``P - 1 .. P + R - 2``, as TRL's ``value[:, context_length - 1 : -1]``)."""
    return values[:, values.shape[1] - response_length - 1:-1]


def score_rollout(base: models.Base, method: method_lib.Method, params: Any, deltas: dict,
                  rollout: gen_lib.Rollout, *, temperature: float = 1.0, mixed: bool = False,
                  reward_pooling: str = "last"
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(logprobs, ref_logprobs, values [B, R], scores [B])`` of ``rollout`` under the actor, the
    reference, the critic and the reward model (``deltas = {"actor": LoRA, "critic": {"lora",
    "head"}, "reward": {"lora", "head"}}``).

    ``mixed=True``: one forward pass of ``4B`` rows, each row's adapter picked by
    :func:`jpeft.multi.mixed` (order :data:`SCORING_ORDER`; the reference rows use none).
    ``mixed=False``: four forward passes of ``B`` rows. Same numbers (up to rounding)."""
    tokens, mask = rollout.tokens, rollout.mask
    r = rollout.response_mask.shape[1]
    b = tokens.shape[0]
    if mixed:
        both = multi.mixed(actor=method, critic=method, reward=method)
        adapters = {"actor": deltas["actor"], "critic": deltas["critic"]["lora"],
                    "reward": deltas["reward"]["lora"]}
        index = jnp.repeat(jnp.array([0, -1, 1, 2], jnp.int32), b)
        logits, hidden = models.run(base, both, params, adapters, jnp.tile(tokens, (4, 1)),
                                    jnp.tile(mask, (4, 1)), index=index)
        actor_logits, ref_logits = logits[:b], logits[b:2 * b]
        critic_hidden, reward_hidden = hidden[2 * b:3 * b], hidden[3 * b:]
    else:
        actor_logits, _ = models.run(base, method, params, deltas["actor"], tokens, mask)
        ref_logits, _ = models.run(base, None, params, None, tokens, mask)
        _, critic_hidden = models.run(base, method, params, deltas["critic"]["lora"], tokens,
                                      mask)
        _, reward_hidden = models.run(base, method, params, deltas["reward"]["lora"], tokens,
                                      mask)
    logprobs = response_logprobs(actor_logits, tokens, mask, r, temperature)
    ref_logprobs = response_logprobs(ref_logits, tokens, mask, r, temperature)
    values = response_values(models.head_values(deltas["critic"]["head"], critic_hidden), r)
    scores = models.pooled_scores(deltas["reward"]["head"], reward_hidden, mask, reward_pooling)
    return logprobs, ref_logprobs, values, scores


def experience_of(base: models.Base, method: method_lib.Method, config: PPOConfig, params: Any,
                  trainable: dict, reward: dict, rollout: gen_lib.Rollout) -> Experience:
    """Step 2 of the module docstring: score the rollout, then rewards, GAE and whitening."""
    logprobs, ref_logprobs, values, scores = score_rollout(
        base, method, params, {**trainable, "reward": reward}, rollout,
        temperature=config.temperature, mixed=config.mixed, reward_pooling=config.reward_pooling)
    m = rollout.response_mask
    rewards = losses.kl_penalized_rewards(scores, logprobs, ref_logprobs, m, config.kl_coef,
                                          config.kl_estimator)
    advantages, returns = losses.gae(rewards, values, m, config.gamma, config.lam)
    advantages = losses.whiten(advantages, m)
    return Experience(rollout.tokens, rollout.mask, m, logprobs, ref_logprobs, values, scores,
                      rewards, advantages, returns)


def ppo_loss(base: models.Base, method: method_lib.Method, config: PPOConfig, params: Any,
             trainable: dict, batch: Experience) -> tuple[jax.Array, dict]:
    """Step 3's loss on a (mini)batch of experience: ``pg_loss + vf_coef * vf_loss`` and the
    metrics ``pg_loss, vf_loss, pg_clipfrac, vf_clipfrac, approx_kl``."""
    m = batch.response_mask
    r = m.shape[1]
    logits, _ = models.run(base, method, params, trainable["actor"], batch.tokens, batch.mask)
    new_logprobs = response_logprobs(logits, batch.tokens, batch.mask, r, config.temperature)
    new_values = response_values(models.scalar_values(base, method, params, trainable["critic"],
                                                      batch.tokens, batch.mask), r)
    pg_loss, pg_clipfrac, approx_kl = losses.ppo_policy_loss(
        new_logprobs, batch.logprobs, batch.advantages, m, config.clip_range)
    vf_loss, vf_clipfrac = losses.ppo_value_loss(new_values, batch.values, batch.returns, m,
                                                 config.clip_range_value)
    loss = pg_loss + config.vf_coef * vf_loss
    return loss, {"pg_loss": pg_loss, "vf_loss": vf_loss, "pg_clipfrac": pg_clipfrac,
                  "vf_clipfrac": vf_clipfrac, "approx_kl": approx_kl}


def optimizer_of(config: PPOConfig) -> optax.GradientTransformation:
    """Global-norm clipping over the actor and critic gradients together (TRL's
    ``max_grad_norm``), then AdamW at ``lr`` without weight decay."""
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.adamw(config.lr, weight_decay=0.0))


def make_ppo(base: models.Base, method: method_lib.Method, config: PPOConfig = PPOConfig()
             ) -> PPO:
    """PPO's compiled pieces (:class:`PPO`) for ``base`` with every delta a LoRA of ``method``
    (:func:`jpeft.rlhf.models.adapter`)."""
    if config.ppo_epochs < 1 or config.minibatches < 1:
        raise ValueError(f"make_ppo: ppo_epochs and minibatches must be >= 1, got "
                         f"{config.ppo_epochs} and {config.minibatches}")
    generate = gen_lib.make_generator(base, method, new_tokens=config.new_tokens,
                                      temperature=config.temperature)
    experience = jax.jit(lambda p, t, rw, ro: experience_of(base, method, config, p, t, rw, ro))
    optimizer = optimizer_of(config)
    step = jpeft.make_train_step(
        lambda p, t, batch, key: ppo_loss(base, method, config, p, t, batch), optimizer)
    return PPO(config, base, method, optimizer, generate, experience, step)


def init_state(ppo: PPO, key: jax.Array, reward: dict | None = None) -> PPOState:
    """A fresh actor LoRA (zero effect: the actor starts as the reference) and a critic that
    starts as a copy of the reward model (``reward``: DeepSpeed-Chat initialises the critic from
    the reward model), else a fresh LoRA and head; with their optimizer state."""
    k1, k2 = jax.random.split(key)
    base = ppo.base
    actor = ppo.method.init(k1, base.params, base.sites)
    critic = (jax.tree.map(jnp.copy, reward) if reward is not None
              else models.init_scalar(k2, base, ppo.method))
    trainable = {"actor": actor, "critic": critic}
    state = PPOState(trainable, jpeft.init_opt_state(ppo.optimizer, trainable))
    return models.placed(state, base.params)


def iteration(ppo: PPO, params: Any, state: PPOState, reward: dict, ids: Any, mask: Any,
              key: jax.Array, *, seed: int = 0) -> tuple[PPOState, Experience, dict]:
    """One PPO iteration on prompts ``ids, mask [B, P]`` (module docstring): returns the new
    state, the experience it trained on and the metrics (``score``: mean reward-model score;
    ``kl``: mean per-token ``logprobs - ref_logprobs`` of the rollout; the loss terms of the
    last step, and ``skipped`` steps). ``params`` is the one base tree every model runs on."""
    config = ppo.config
    k_gen, k_step = jax.random.split(key)
    rollout = ppo.generate(params, state.trainable["actor"], ids, mask, k_gen)
    exp = ppo.experience(params, state.trainable, reward, rollout)
    b = exp.tokens.shape[0]
    size = b // config.minibatches
    if size < 2:
        raise ValueError(f"iteration: {b} rollouts in {config.minibatches} minibatches leave "
                         f"fewer than 2 per minibatch")
    rng = np.random.default_rng(seed)
    trainable, opt_state = state
    metrics, skipped, n = {}, 0, 0
    for epoch in range(config.ppo_epochs):
        order = rng.permutation(b) if config.minibatches > 1 else np.arange(b)
        for j in range(config.minibatches):
            batch = exp if config.minibatches == 1 else jax.tree.map(
                lambda x, idx=order[j * size:(j + 1) * size]: x[idx], exp)
            trainable, opt_state, metrics = ppo.step(params, trainable, opt_state, batch,
                                                     jax.random.fold_in(k_step, n))
            skipped += int(metrics.get("skipped", False))
            n += 1
    m = exp.response_mask.astype(jnp.float32)
    out = {"score": float(jnp.mean(exp.scores)),
           "kl": float(jnp.sum((exp.logprobs - exp.ref_logprobs) * m) / jnp.sum(m)),
           "skipped": skipped, "steps": n}
    out.update({k: float(metrics[k]) for k in ("loss", "pg_loss", "vf_loss", "pg_clipfrac",
                                               "vf_clipfrac", "approx_kl")})
    return PPOState(trainable, opt_state), exp, out


def step_memory(ppo: PPO, params: Any, state: PPOState, exp: Experience) -> dict:
    """``memory_analysis()`` of the compiled PPO step on these arguments (bytes: ``argument``,
    ``output``, ``alias``, ``temp``, ``peak`` where the backend gives it), compiled for the
    report (without running it)."""
    compiled = ppo.step.lower(params, state.trainable, state.opt_state, exp,
                              jax.random.key(0)).compile()
    ma = compiled.memory_analysis()
    out = {}
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                  "temp_size_in_bytes", "peak_memory_in_bytes"):
        v = getattr(ma, field, None) if ma is not None else None
        out[field.replace("_size_in_bytes", "_bytes").replace("_in_bytes", "_bytes")] = (
            None if v is None else int(v))
    return out


__all__ = ["Experience", "PPO", "PPOConfig", "PPOState", "SCORING_ORDER", "experience_of",
           "init_state", "iteration", "make_ppo", "optimizer_of", "ppo_loss", "response_logprobs",
           "response_values", "score_rollout", "step_memory"]
