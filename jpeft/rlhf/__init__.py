"""RLHF on one base: the losses of DPO/IPO, reward modelling and PPO as pure JAX functions
(:mod:`jpeft.rlhf.losses`)."""

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

__all__ = [
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
