"""RLHF on one base: the losses of DPO/IPO, reward modelling and PPO as pure JAX functions
(:mod:`jpeft.rlhf.losses`), and DeepSpeed-Chat's three steps as PEFT on one frozen decoder:
:mod:`~jpeft.rlhf.models` (the one base; actor, critic, reward and reference on it),
:mod:`~jpeft.rlhf.generate` (rollouts by cached generation), :mod:`~jpeft.rlhf.sft`,
:mod:`~jpeft.rlhf.preferences` (the sentiment classifier and the preference pairs),
:mod:`~jpeft.rlhf.reward`, :mod:`~jpeft.rlhf.ppo`, :mod:`~jpeft.rlhf.dpo`,
:mod:`~jpeft.rlhf.evaluate`, and :mod:`~jpeft.rlhf.pipeline` (the stages and ``main(argv)``)."""

from jpeft.rlhf.losses import (
    dpo_loss,
    extend_mask,
    gae,
    kl_penalized_rewards,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    reward_pair_loss,
    sequence_logprobs,
    token_logprobs,
    whiten,
)

from jpeft.rlhf import (  # noqa: E402
    dpo,
    evaluate,
    generate,
    models,
    pipeline,
    ppo,
    preferences,
    reward,
    sft,
)

__all__ = [
    "dpo", "evaluate", "generate", "models", "pipeline", "ppo", "preferences", "reward", "sft",
    "dpo_loss",
    "extend_mask",
    "gae",
    "kl_penalized_rewards",
    "masked_mean",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reward_pair_loss",
    "sequence_logprobs",
    "token_logprobs",
    "whiten",
]
