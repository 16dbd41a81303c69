"""The JAX floor of the decoder: the LLaMA train steps written by hand in plain ``jax.numpy``.

The same math as ``jpeft.wrap(jpeft.nnx.split(LlamaForCausalLM)...)`` in ``decoder_cost.py``,
written the way a user would write it without a library: token embedding, ``L`` pre-norm layers
(RMSNorm; q, k, v projections, rotary embeddings, grouped-query attention through
``jax.nn.dot_product_attention`` under a causal and padding mask, output projection, residual;
RMSNorm, SwiGLU MLP, residual), final RMSNorm, untied ``lm_head``. The layers are a Python loop
(unrolled), float32. Activations are kept as ``[B*T, H]`` matrices so that every linear map is
a 2-D matrix product (``benchmarks/floor.py``'s ``flat`` layout); only attention sees
``[B, T, heads, D]``.

LoRA is inline, factored: ``y = x W + s (x A) B`` with ``A [in, r]``, ``B [r, out]``,
``s = alpha / r``. The frozen weights are one argument of the step and the trainable part another;
``jax.value_and_grad`` runs over the trainable part only, ``optax.adamw`` on it (its state is
the trainable part's only), both buffers donated.

Configurations (:data:`CONFIGS`): ``full`` (every weight trained), ``lora_qv`` (LoRA on
``q_proj``, ``v_proj`` of every layer), ``lora_all_linear`` (LoRA on the seven projections of every
layer; never on ``lm_head``).

Weights are read from the NNX parameter tree of ``jpeft.models.llama.LlamaForCausalLM``
(``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, the tree ``jpeft.nnx.split`` returns) into
the floor's own tree (:func:`weights_from_params`) so that both sides start from the same
weights; nothing here imports jpeft.

Shapes: ``B`` batch, ``T`` tokens, ``H`` hidden, ``N`` query heads, ``K`` key/value heads, ``D``
head size, ``I`` intermediate size, ``V`` vocabulary, ``r`` LoRA rank.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from decoder_torch import ALPHA, LR, RANK, WEIGHT_DECAY  # (benchmarks/decoder_torch.py, no JAX)

CONFIGS = ("full", "lora_qv", "lora_all_linear")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The projections each LoRA configuration adapts (in every layer).
LORA_TARGETS = {"lora_qv": ("q_proj", "v_proj"), "lora_all_linear": PROJECTIONS}


class Dims(NamedTuple):
    """What the forward needs of the config besides the weights' shapes."""

    heads: int          # N
    kv_heads: int       # K
    head_dim: int       # D
    eps: float          # RMSNorm's epsilon
    theta: float        # rotary base


def dims(config: Any) -> Dims:
    """:class:`Dims` of a ``LlamaConfig``; ``ValueError`` for what the floor does not write (tied
    embeddings, biases, an activation other than SiLU, the scanned layer layout)."""
    unsupported = {"tie_word_embeddings": config.tie_word_embeddings,
                   "attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias,
                   "scan_layers": config.scan_layers,
                   "hidden_act": config.hidden_act not in ("silu", "swish")}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"the decoder floor does not implement {bad}")
    return Dims(config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                config.rms_norm_eps, config.rope_theta)


def weights_from_params(params: dict) -> dict:
    """The floor's weight tree from the NNX parameter tree (``params["model"]["layers"][i]
    ["self_attn"]["q_proj"]["kernel"]``, ...): ``{"embed_tokens": [V, H], "layers": [{
    "input_layernorm": [H], "q_proj": [H, N D], "k_proj", "v_proj": [H, K D], "o_proj": [N D, H],
    "post_attention_layernorm": [H], "gate_proj", "up_proj": [H, I], "down_proj": [I, H]}] * L,
    "norm": [H], "lm_head": [H, V]}`` (the same arrays, not copies)."""
    model = params["model"]
    layers = []
    for i in sorted(model["layers"], key=int):
        p = model["layers"][i]
        layer = {name: p[group][name]["kernel"]
                 for group, names in (("self_attn", PROJECTIONS[:4]), ("mlp", PROJECTIONS[4:]))
                 for name in names}
        layer["input_layernorm"] = p["input_layernorm"]["scale"]
        layer["post_attention_layernorm"] = p["post_attention_layernorm"]["scale"]
        layers.append(layer)
    return {"embed_tokens": model["embed_tokens"]["embedding"], "layers": layers,
            "norm": model["norm"]["scale"], "lm_head": params["lm_head"]["kernel"]}


# --------------------------------------------------------------------------------------------
# Forward


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``scale * x / sqrt(mean(x^2) + eps)`` over the last axis: ``[..., H] -> [..., H]``."""
    return scale * (x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps))


def rotary(attention_mask: jax.Array, head_dim: int, theta: float
           ) -> tuple[jax.Array, jax.Array]:
    """``cos, sin [B, T, 1, D/2]`` of the rotary angles ``p_t / theta^(2i/D)``, ``i < D/2``, at
    the positions ``p = max(cumsum(mask) - 1, 0)`` (the ``j``-th real token of a row is at
    ``j``, whatever padding precedes it)."""
    pos = jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)
    inv_freq = 1.0 / (jnp.float32(theta)
                      ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = pos.astype(jnp.float32)[..., None, None] * inv_freq          # [B, T, 1, D/2]
    return jnp.cos(angles), jnp.sin(angles)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Heads ``x [B, T, n, D]`` rotated pairwise across the halves ``x = [x1, x2]``:
    ``[x1 cos - x2 sin, x2 cos + x1 sin]`` (the two halves share frequencies)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask_4d(attention_mask: jax.Array) -> jax.Array:
    """``[B, T] -> [B, 1, T, T]`` bool: query ``t`` sees key ``s`` iff ``s <= t`` and key ``s``
    is a real token."""
    t = attention_mask.shape[-1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    return (causal[None] & attention_mask.astype(bool)[:, None, :])[:, None]


def forward(weights: dict, lora: dict, scale: float, input_ids: jax.Array,
            attention_mask: jax.Array, d: Dims) -> jax.Array:
    """Logits ``[B, T, V]``. ``weights``: :func:`weights_from_params`' tree; ``lora``:
    ``{"<layer>/<projection>": (A [in, r], B [r, out])}`` (empty: no LoRA)."""
    b, t = input_ids.shape
    cos, sin = rotary(attention_mask, d.head_dim, d.theta)
    allowed = attention_mask_4d(attention_mask)
    x = weights["embed_tokens"][input_ids.reshape(b * t)]                  # [B*T, H]
    for i, w in enumerate(weights["layers"]):
        def linear(h, name, w=w, i=i):
            y = h @ w[name]
            if f"{i}/{name}" in lora:
                a, bb = lora[f"{i}/{name}"]
                y = y + scale * ((h @ a) @ bb)
            return y

        h = rms_norm(x, w["input_layernorm"], d.eps)
        q = rotate(linear(h, "q_proj").reshape(b, t, d.heads, d.head_dim), cos, sin)
        k = rotate(linear(h, "k_proj").reshape(b, t, d.kv_heads, d.head_dim), cos, sin)
        v = linear(h, "v_proj").reshape(b, t, d.kv_heads, d.head_dim)
        ctx = jax.nn.dot_product_attention(q, k, v, mask=allowed)          # [B, T, N, D]
        x = x + linear(ctx.reshape(b * t, d.heads * d.head_dim), "o_proj")
        h = rms_norm(x, w["post_attention_layernorm"], d.eps)
        x = x + linear(jax.nn.silu(linear(h, "gate_proj")) * linear(h, "up_proj"), "down_proj")
    return (rms_norm(x, weights["norm"], d.eps) @ weights["lm_head"]).reshape(b, t, -1)


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array
                   ) -> jax.Array:
    """Mean next-token cross-entropy: ``logits[:, t]`` against ``input_ids[:, t + 1]``, weighted
    by ``attention_mask[:, t + 1]`` (real targets only)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], input_ids[:, 1:])
    w = attention_mask[:, 1:].astype(jnp.float32)
    return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


# --------------------------------------------------------------------------------------------
# Training


def init(config: str, weights: dict, *, rank: int = RANK, seed: int = 0) -> tuple[dict, dict]:
    """``(frozen, trainable)``; ``trainable = {"weights": ..., "lora": ...}``, the weights it
    holds replacing the frozen ones by top-level key. ``full``: nothing frozen, every weight
    trained; LoRA: every weight frozen, ``A`` Kaiming-uniform as in PEFT (``U(-1/sqrt(in),
    1/sqrt(in))``), ``B`` zero (so the first step's loss is the base model's)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown decoder floor config {config!r}; choose from {CONFIGS}")
    if config == "full":
        return {}, {"weights": weights, "lora": {}}
    key = jax.random.key(seed)
    lora = {}
    for i, w in enumerate(weights["layers"]):
        for name in LORA_TARGETS[config]:
            d_in, d_out = w[name].shape
            key, sub = jax.random.split(key)
            bound = 1.0 / math.sqrt(d_in)
            lora[f"{i}/{name}"] = (jax.random.uniform(sub, (d_in, rank), w[name].dtype,
                                                      -bound, bound),
                                   jnp.zeros((rank, d_out), w[name].dtype))
    return weights, {"weights": {}, "lora": lora}


def loss_fn(trainable: dict, frozen: dict, batch: dict, d: Dims, scale: float) -> jax.Array:
    """:func:`causal_lm_loss` of :func:`forward` on the frozen weights updated by the
    trainable ones."""
    logits = forward({**frozen, **trainable["weights"]}, trainable["lora"], scale,
                     batch["input_ids"], batch["attention_mask"], d)
    return causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"])


def make_step(optimizer: optax.GradientTransformation, d: Dims, scale: float, *,
              compiler_options: dict | None = None) -> Callable:
    """``step(frozen, trainable, opt_state, batch) -> (trainable, opt_state, loss)``, jitted
    (with XLA ``compiler_options`` when given), ``trainable`` and ``opt_state`` donated."""
    def step(frozen, trainable, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch, d, scale)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(1, 2), compiler_options=compiler_options or None)


def prepare(config: str, model: Any, batch: dict, *,
            compiler_options: dict | None = None) -> Callable[[], float]:
    """``run_step() -> loss`` of ``config`` on the weights of ``model`` (a
    ``LlamaForCausalLM``, unrolled), ``batch`` (``input_ids``, ``attention_mask`` ``[B, T]``, on
    the device) each step: ``optax.adamw(LR, weight_decay=WEIGHT_DECAY)``, LoRA rank ``RANK``,
    ``s = ALPHA / RANK`` (``decoder_cost.py``'s), compiled ahead of time for ``batch``."""
    d = dims(model.config)
    frozen, trainable = init(config, weights_from_params(nnx.to_pure_dict(
        nnx.state(model, nnx.Param))))
    trainable = jax.tree.map(jnp.copy, trainable)      # donated: never the model's own buffers
    opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    state = {"trainable": trainable, "opt_state": opt.init(trainable)}
    del trainable
    compiled = make_step(opt, d, ALPHA / RANK, compiler_options=compiler_options).lower(
        frozen, state["trainable"], state["opt_state"], batch).compile()

    def run_step() -> float:
        state["trainable"], state["opt_state"], loss = compiled(
            frozen, state["trainable"], state["opt_state"], batch)
        return float(jax.block_until_ready(loss))
    return run_step
