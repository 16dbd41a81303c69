"""The one frozen decoder and the models RLHF runs on it: actor, critic, reward and reference.

DeepSpeed-Chat's step 3 holds four models: the actor (the policy being trained), the reference
(the policy it must not drift from), the reward model and the critic (a value per token). With
PEFT they are **one base parameter tree** and three small deltas::

    actor     = base + actor LoRA                      -> logits   [B, T, V]
    reference = base (no delta)                        -> logits   [B, T, V]
    critic    = base + critic LoRA, then value head    -> values   [B, T]
    reward    = base + reward LoRA, then reward head   -> scores   [B]   (at the last real token)

Every function here takes the base ``params`` as an argument (the same tree object for all four
models: nothing is copied, nothing is merged per model) and a delta. A LoRA delta changes the
contractions of the base weights on the fly (``jpeft.wrap``, factored form: ``y = x W0 + s (x A)
B``); the reference is the plain apply on the same ``params``.

**Hidden states.** :class:`jpeft.models.llama.LlamaForCausalLM` returns logits only; its
``model`` attribute (a :class:`~jpeft.models.llama.LlamaModel`) returns the final hidden state,
after the last RMSNorm. :func:`build_base` splits the *causal LM* with a method that calls
``m.model(ids, mask)`` and applies the LM head itself (:func:`logits_and_hidden`), so one apply
gives both ``(logits [B, T, V], hidden [B, T, H])`` and its parameter paths are the causal LM's
(``model/layers/0/self_attn/q_proj/kernel``, ``lm_head/kernel``): the LoRA deltas and the sites
are the same for generation, the policy and the scalar models.

**Scalar heads** (:func:`init_head`, :func:`head_values`, :func:`last_token_scores`) are separate
pure functions of the hidden states, with their own small tree ``{"kernel": [H, 1], "bias":
[1]}`` -- not parameters of the base, so the base stays exactly what it was. A scalar model's
delta is ``{"lora": <LoRA delta>, "head": <head>}``:

    values[b, t] = hidden[b, t] . kernel[:, 0] + bias[0]
    score[b]     = values[b, last(b)],  last(b) = the last t with mask[b, t] = 1   ("last")
                 = sum_t mask[b, t] values[b, t] / sum_t mask[b, t]                  ("mean")

(DeepSpeed-Chat's ``RewardModel``: a ``v_head`` on the last hidden state, read at the last real
token for the sequence's reward, at every token for the critic's values. ``"mean"`` is offered
for the tiny decoder of the example, see :func:`pooled_scores`.)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import jpeft
from jpeft.core import method as method_lib
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM, last_real_index

#: Byte-level vocabulary: bytes 0..255 and a padding token (as the decoder example,
#: :mod:`jpeft.recipes.decoder`).
PAD = 256
#: The linear maps of every decoder layer that the RLHF adapters adapt.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Params = Any
Delta = Any


def decoder_config(max_positions: int, *, hidden_size: int = 64, intermediate_size: int = 128,
                   num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2
                   ) -> LlamaConfig:
    """The decoder example's byte-level LLaMA (vocabulary 257 = bytes + padding; 64 wide, 2
    layers, 4 query heads, 2 key/value heads by default), with ``max_positions`` positions."""
    return LlamaConfig.tiny(vocab_size=PAD + 1, hidden_size=hidden_size,
                            intermediate_size=intermediate_size, num_attention_heads=num_heads,
                            num_key_value_heads=num_kv_heads, num_hidden_layers=num_layers,
                            max_position_embeddings=max_positions)


def logits_and_hidden(module: LlamaForCausalLM, ids: jax.Array, mask: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """``(logits [B, T, V], hidden [B, T, H])`` of the causal LM: ``hidden`` is its
    :class:`~jpeft.models.llama.LlamaModel`'s output (after the final norm), ``logits`` the LM
    head on it (the tied embedding when ``tie_word_embeddings``) -- what ``module(ids, mask)``
    returns, plus the hidden state it is computed from."""
    hidden, _ = module.model(ids, mask)
    if module.config.tie_word_embeddings:
        logits = module.model.embed_tokens.attend(hidden)
    else:
        logits = module.lm_head(hidden)
    return logits, hidden


class Base(NamedTuple):
    """The one frozen decoder.

    ``params``: its parameter tree (the only copy any model uses). ``forward(params, ids [B, T],
    mask [B, T]) -> (logits [B, T, V], hidden [B, T, H])``: the plain apply (the reference model).
    ``sites``: its contraction sites (:func:`jpeft.probe`), for LoRA. ``module``: an abstract
    (shape-only) module, to split other methods with (:func:`apply_of`: generation).
    """
    config: LlamaConfig
    params: Params
    sites: Any
    forward: Callable[..., tuple[jax.Array, jax.Array]]
    module: Any

    def apply_of(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``apply(params, *args)`` running ``fn(module, *args)`` on a module built from
        ``params`` (:func:`jpeft.nnx.split` with ``method=fn``): the same parameter paths."""
        return jpeft.nnx.split(self.module, method=fn)[0]


def build_base(config: LlamaConfig, params: Params | None = None, *, seed: int = 0) -> Base:
    """The :class:`Base` of ``config`` holding ``params`` (``None``: a fresh random init with
    ``seed``, as ``LlamaForCausalLM(config, rngs=nnx.Rngs(seed))``)."""
    if params is None:
        _, params = jpeft.nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(seed)))
        params = jax.device_put(params, jax.devices()[0])
    module = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(seed)))
    forward, _ = jpeft.nnx.split(module, method=logits_and_hidden)
    probe_ids = jnp.zeros((2, 4), jnp.int32)
    sites = jpeft.probe(forward, params, probe_ids, jnp.ones_like(probe_ids))
    return Base(config, params, sites, forward, module)


def placed(tree: Any, params: Params) -> Any:
    """``tree`` put on the device of ``params`` when that is one device (committed arrays).

    A compiled step's outputs are committed to their device; a fresh delta or optimizer state is
    not. Passing one and then the other recompiles the step once more (``jax.jit`` keys its cache
    on committedness), so the training loops place their starting state with this first."""
    leaf = next(iter(jax.tree.leaves(params)), None)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return jax.device_put(tree, sharding)
    return tree


def adapter(rank: int = 8, alpha: float = 16.0) -> method_lib.Method:
    """The LoRA every RLHF model uses (SFT, actor, critic, reward, DPO policy): rank ``rank`` on
    every linear map of every decoder layer (:data:`TARGETS`; not the embedding, not the LM
    head)."""
    return jpeft.lora(TARGETS, rank=rank, alpha=alpha)


# --------------------------------------------------------------------------------------------
# Forward passes with a delta


def run(base: Base, method: method_lib.Method | None, params: Params, delta: Delta,
        ids: jax.Array, mask: jax.Array, *, index: jax.Array | None = None
        ) -> tuple[jax.Array, jax.Array]:
    """``(logits [B, T, V], hidden [B, T, H])`` of ``base + delta`` (``method=None``: the base
    alone, ``delta`` ignored). ``index [B]`` selects each row's adapter of a
    :func:`jpeft.multi.mixed` method (``-1``: the base)."""
    if method is None:
        return base.forward(params, ids, mask)
    f = jpeft.wrap(base.forward, method, base.sites)
    if index is None:
        return f(params, delta, ids, mask)
    return f(params, delta, ids, mask, method_inputs=index)


def init_head(key: jax.Array, hidden_size: int, dtype: Any = jnp.float32) -> dict:
    """A scalar head ``{"kernel": [H, 1], "bias": [1]}``: kernel ``U(-1/sqrt(H), 1/sqrt(H))``
    (``torch.nn.Linear``'s default, DeepSpeed-Chat's ``v_head``), bias 0."""
    bound = hidden_size ** -0.5
    kernel = jax.random.uniform(key, (hidden_size, 1), dtype, -bound, bound)
    return {"kernel": kernel, "bias": jnp.zeros((1,), dtype)}


def head_values(head: dict, hidden: jax.Array) -> jax.Array:
    """The head at every position: ``hidden [B, T, H] -> hidden . kernel[:, 0] + bias [B, T]``
    (computed in float32)."""
    h = hidden.astype(jnp.float32)
    return h @ head["kernel"][:, 0].astype(jnp.float32) + head["bias"][0].astype(jnp.float32)


def last_token_scores(head: dict, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """The head at each row's last real token: ``hidden [B, T, H], mask [B, T] -> [B]``
    (:func:`jpeft.models.llama.last_real_index`)."""
    last = last_real_index(mask)
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return head_values(head, h[:, None])[:, 0]


#: How a scalar model reads one score per sequence from its per-token head values.
POOLINGS = ("last", "mean")


def pooled_scores(head: dict, hidden: jax.Array, mask: jax.Array, pooling: str = "last"
                  ) -> jax.Array:
    """One score per sequence, ``hidden [B, T, H], mask [B, T] -> [B]``: ``"last"`` the head at
    the last real token (:func:`last_token_scores`, DeepSpeed-Chat's reward), ``"mean"`` the
    head's mean over the real tokens, ``sum_t mask_t values_t / sum_t mask_t``. (On the tiny
    byte-level decoder of the RLHF example, whose two layers carry little of a sequence into
    its last position, ``"mean"`` learns the preferences better: held-out pair accuracy about
    0.63 against 0.53-0.58.)"""
    if pooling == "last":
        return last_token_scores(head, hidden, mask)
    if pooling == "mean":
        m = mask.astype(jnp.float32)
        return jnp.sum(head_values(head, hidden) * m, axis=1) / jnp.maximum(jnp.sum(m, 1), 1.0)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")


def init_scalar(key: jax.Array, base: Base, method: method_lib.Method) -> dict:
    """A scalar model's delta (critic or reward): ``{"lora": method.init(...), "head":
    init_head(...)}``."""
    k1, k2 = jax.random.split(key)
    return {"lora": method.init(k1, base.params, base.sites),
            "head": init_head(k2, base.config.hidden_size)}


def scalar_values(base: Base, method: method_lib.Method, params: Params, delta: dict,
                  ids: jax.Array, mask: jax.Array) -> jax.Array:
    """A scalar model's value at every position, ``[B, T]`` (the critic)."""
    _, hidden = run(base, method, params, delta["lora"], ids, mask)
    return head_values(delta["head"], hidden)


def sequence_scores(base: Base, method: method_lib.Method, params: Params, delta: dict,
                    ids: jax.Array, mask: jax.Array, pooling: str = "last") -> jax.Array:
    """A scalar model's score of each sequence, ``[B]`` (the reward model): its head at the last
    real token, or averaged over the real tokens (:func:`pooled_scores`)."""
    _, hidden = run(base, method, params, delta["lora"], ids, mask)
    return pooled_scores(delta["head"], hidden, mask, pooling)


__all__ = [
    "PAD", "POOLINGS", "TARGETS", "Base", "adapter", "build_base", "decoder_config", "head_values",
    "init_head", "init_scalar", "last_token_scores", "logits_and_hidden", "placed",
    "pooled_scores", "run",
    "scalar_values", "sequence_scores",
]
