"""A LLaMA-style decoder-only causal language model in Flax NNX, with Hugging Face parameter names.

The module tree is the one of ``transformers.LlamaForCausalLM``: every parameter's module path,
joined with ``"."``, is the Hugging Face state-dict key without its leaf name, e.g.::

    model.model.layers[0].self_attn.q_proj.kernel
        <->  "model.layers.0.self_attn.q_proj.weight"   (kernel = weight.T)

Leaf names are Flax's: ``kernel`` (``[in, out]``, the transpose of a ``torch.nn.Linear`` weight),
``bias``, ``embedding`` (``nnx.Embed``) and ``scale`` (:class:`LlamaRMSNorm`). ``lm_head`` exists
only with ``tie_word_embeddings=False``; tied models compute ``logits = h @ embedding.T``.

Every projection is a plain :class:`flax.nnx.Linear` called normally (q, k and v are separate, and
kernels are used as stored), so code that adapts a linear map by intercepting the ``dot_general``
on its kernel sees all of them.

Two layouts of the layer stack, chosen by ``LlamaConfig.scan_layers``:

* unrolled (default): ``model.layers`` is an :class:`flax.nnx.List` of ``L`` decoder layers,
  parameter paths ``('model', 'layers', i, 'self_attn', 'q_proj', 'kernel')``;
* scanned: ``model.layers`` is one decoder layer whose parameters carry a leading ``[L, ...]`` axis
  (created with ``nnx.vmap`` / ``nnx.split_rngs``), paths ``('model', 'layers', 'self_attn',
  'q_proj', 'kernel')``, run with ``nnx.scan`` over layers (the KV cache is scanned with them).

:func:`load_hf_llama` and :func:`llama_to_hf_state` convert either layout from/to a Hugging Face
state dict; :func:`convert_layers` converts between the layouts.

Shapes: ``B`` batch, ``T`` new tokens, ``S`` key slots (``T`` without a cache, the cache length
with one), ``H`` hidden size, ``N`` query heads, ``K`` key/value heads, ``G = N / K`` query heads
per key/value head, ``D`` head size, ``I`` intermediate size, ``V`` vocabulary, ``L`` layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpeft.core.marks import mark
from jpeft.models.sharding_rules import constrain
from jpeft.models.bert import get_activation
from jpeft.models.hf_config import HFConfig

Array = jax.Array
Dtype = Any

SUPPORTED_ROPE_TYPES = ("default",)
"""Rotary embedding variants implemented here (plain RoPE, no frequency scaling)."""

IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
"""State-dict keys ending with these are buffers (recomputed here), not parameters."""


# --------------------------------------------------------------------------- configuration


def _rope_type(rope: Mapping[str, Any] | None) -> str:
    if rope is None:
        return "default"
    return str(rope.get("rope_type", rope.get("type", "default")))


#: ``LlamaConfig.remat`` -> the ``jax.checkpoint`` policy each layer runs under (``None``: no
#: rematerialisation).
REMAT_POLICIES = {"none": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}

#: ``LlamaConfig.attention``: the ``implementation`` of :func:`jax.nn.dot_product_attention`.
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(HFConfig):
    """Hyper-parameters of a LLaMA decoder, named as in a Hugging Face ``config.json``.

    ``num_key_value_heads=None`` means ``num_attention_heads`` (multi-head attention) and
    ``head_dim=None`` means ``hidden_size // num_attention_heads``; both are filled in on
    construction. ``rope_scaling`` is accepted only when ``None`` or of type ``"default"`` (then
    stored as ``None``); any other scaling raises a ``ValueError``. ``scan_layers`` is not a Hugging
    Face key: it selects the stacked, ``nnx.scan``-ned layer layout. Neither is ``remat``
    (:data:`REMAT_POLICIES`): ``"none"`` keeps every activation for the backward pass, ``"dots"``
    recomputes each layer but keeps its matrix products' outputs
    (``dots_with_no_batch_dims_saveable``), ``"full"`` keeps only each layer's input
    (``nothing_saveable``). It changes memory and time, never the values. Nor is ``attention``,
    the kernel of :func:`grouped_attention`: ``"xla"`` (the default; any device) or ``"cudnn"``
    (cuDNN's fused flash attention on an NVIDIA GPU, for float16/bfloat16; JAX raises where it
    does not apply).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    scan_layers: bool = False
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {tuple(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: choose one of "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                                 f"num_attention_heads {self.num_attention_heads}; set head_dim")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        rope_type = _rope_type(self.rope_scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope_scaling {self.rope_scaling!r} (rope_type "
                             f"{rope_type!r}); only {SUPPORTED_ROPE_TYPES} rotary embeddings "
                             "without scaling are implemented")
        object.__setattr__(self, "rope_scaling", None)
        get_activation(self.hidden_act)

    @property
    def num_key_value_groups(self) -> int:
        """``G = N / K``: query heads sharing one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> "LlamaConfig":
        """Config from a Hugging Face config dict; unknown keys are ignored, ``overrides`` win.

        Both rope spellings are read: ``rope_theta``/``rope_scaling`` (transformers 4) and
        ``rope_parameters = {"rope_type", "rope_theta", ...}`` (transformers 5; it wins over the
        former when both are present).
        """
        d = dict(d)
        rope = d.pop("rope_parameters", None)
        if isinstance(rope, Mapping):
            if "rope_theta" in rope:
                d["rope_theta"] = rope["rope_theta"]
            if _rope_type(rope) != "default":
                d["rope_scaling"] = dict(rope)
        return cls._build(d, overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "LlamaConfig":
        """A 2-layer, 64-wide config for tests: vocab 128, intermediate 128, 4 query heads and 2
        key/value heads of size 16, 128 positions."""
        base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        base.update(overrides)
        return cls(**base)


# --------------------------------------------------------------------------- pure functions


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """``scale * (x / sqrt(mean(x^2, -1) + eps))`` over the last axis: ``[..., H] -> [..., H]``.

    As in Hugging Face, the normalisation runs in float32 and is cast back to ``x.dtype`` before
    the (promoted) multiplication by ``scale``.
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * y.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> Array:
    """Rotary inverse frequencies ``1 / theta^(2i / D)`` for ``i < D / 2``: ``[D / 2]`` float32."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponents)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """``cos`` and ``sin`` of the rotary angles, each ``[B, T, D]`` float32.

    ``angle[b, t] = concat(f, f)`` with ``f = positions[b, t] * rope_inv_freq``: the two halves of
    the head share frequencies (Hugging Face's ``rotate_half`` convention).
    """
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: Array) -> Array:
    """``[x1, x2] -> [-x2, x1]`` with ``x1, x2`` the halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate heads ``x [B, T, n, D]`` by ``cos, sin [B, T, D]``: ``x cos + rotate_half(x) sin``."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def positions_from_mask(attention_mask: Array, start: Array | None = None) -> Array:
    """Rotary positions ``[B, T]`` of the tokens of a (left- or right-) padded batch.

    ``positions = start + cumsum(mask) - 1``: the ``j``-th real token of a row gets ``start + j``;
    padding gets the position of the next real token (or ``start``) and is masked anyway.
    ``start`` (``[B]``, default 0) is the number of real tokens already in a cache.
    """
    mask = attention_mask.astype(jnp.int32)
    if start is None:
        start = jnp.zeros(mask.shape[:1], jnp.int32)
    pos = start[:, None] + jnp.cumsum(mask, axis=-1) - 1
    return jnp.maximum(pos, start[:, None])


def causal_mask(query_slots: Array, key_mask: Array) -> Array:
    """Which keys each query may attend to: ``[T], [B, S] -> [B, T, S]`` bool.

    Query ``t`` sits at slot ``query_slots[t]`` of the key sequence; it sees slot ``s`` iff
    ``s <= query_slots[t]`` (causality) and ``key_mask[b, s]`` (not padding / not yet written).
    """
    slots = jnp.arange(key_mask.shape[-1])
    causal = slots[None, :] <= query_slots[:, None]
    return causal[None, :, :] & key_mask.astype(bool)[:, None, :]


def grouped_attention(q: Array, k: Array, v: Array, allowed: Array,
                      implementation: str = "xla") -> Array:
    """Grouped-query scaled dot-product attention: ``q [B, T, N, D], k, v [B, S, K, D],
    allowed [B, T, S] -> [B, T, N, D]``, through :func:`jax.nn.dot_product_attention` with
    ``implementation`` (``"xla"``, or ``"cudnn"``: cuDNN's fused flash attention on a GPU).

    Query head ``h`` uses key/value head ``h // (N / K)`` (Hugging Face's ``repeat_kv``, without
    copying ``k`` and ``v``). ``P = softmax(q k^T / sqrt(D))`` over the allowed keys (scores and
    softmax in float32; a query with no allowed key gets uniform weights), output ``P v`` in
    ``v``'s dtype.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None, :, :],
                                        implementation=implementation)


def attention_lse(q: Array, k: Array, allowed: Array) -> Array:
    """The log-normaliser of :func:`grouped_attention`'s softmax: ``q [B, T, N, D], k [B, S, K, D],
    allowed [B, T, S] -> logsumexp_s(q k_s / sqrt(D)) [B, T, N]`` over the allowed keys, float32
    (a query with no allowed key gets about ``finfo.min``).

    The model marks it as the read-only hook point ``lse`` for methods that extend the attention
    (prefix tuning); a fused attention never forms it, so it is computed here, from the scores
    again, and only where a method reads it (unused, the compiler removes it).
    """
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, d)
    s = jnp.einsum("btkgd,bskd->btkgs", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    s = jnp.where(allowed[:, :, None, None, :], s, jnp.finfo(jnp.float32).min)
    return jax.nn.logsumexp(s, axis=-1).reshape(b, t, n)


def last_real_index(attention_mask: Array) -> Array:
    """Index ``[B]`` of the last column with ``mask == 1`` (``T - 1`` for an all-padding row)."""
    t = attention_mask.shape[-1]
    return (t - 1) - jnp.argmax(jnp.flip(attention_mask.astype(bool), axis=-1), axis=-1)


def select_token(logits: Array, key: Array | None = None, temperature: float | Array = 0.0, *,
                 top_k: int | None = None) -> Array:
    """Next tokens ``[B]`` int32 from logits ``[B, V]``.

    ``temperature == 0`` (or no ``key``): greedy, ``argmax(logits)`` (the first maximum).
    ``temperature > 0``: a sample from ``softmax(logits / temperature)`` restricted to the
    ``top_k`` largest logits when given. ``temperature`` may be traced: both branches are computed
    and one is selected, so greedy and sampled decoding share one compiled program.
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        return greedy
    sample = temperature > 0
    scaled = logits / jnp.where(sample, temperature, 1.0)
    if top_k is not None:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(sample, sampled, greedy)


# --------------------------------------------------------------------------- KV cache


class LayerKV(NamedTuple):
    """Keys and values of one layer, each ``[B, S, K, D]`` (``[L, B, S, K, D]`` when stacked)."""

    keys: Array
    values: Array


class KVCache(NamedTuple):
    """A preallocated key/value cache: a pytree, safe to pass through ``jit`` and ``lax`` loops.

    ``keys``, ``values``: ``[L, B, S, K, D]``; ``mask``: ``[B, S]`` int32, 1 where a slot holds a
    real token; ``length``: ``[]`` int32, slots written so far (the same for every row; padding
    takes slots too); ``next_position``: ``[B]`` int32, the rotary position of each row's next
    real token. New tokens are written at slots ``length .. length + T - 1``; writing past ``S``
    is not checked (``dynamic_update_slice`` would clamp), so size ``S`` for prompt + generation.
    """

    keys: Array
    values: Array
    mask: Array
    length: Array
    next_position: Array

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]


def init_cache(config: LlamaConfig, batch_size: int, max_length: int,
               dtype: Dtype = jnp.float32) -> KVCache:
    """An empty :class:`KVCache` of ``max_length`` slots (zeros, nothing attended)."""
    shape = (config.num_hidden_layers, batch_size, max_length, config.num_key_value_heads,
             config.head_dim)
    return KVCache(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   mask=jnp.zeros((batch_size, max_length), jnp.int32),
                   length=jnp.zeros((), jnp.int32),
                   next_position=jnp.zeros((batch_size,), jnp.int32))


# --------------------------------------------------------------------------- modules


class _LlamaModule(nnx.Module):
    """Shared fields: the config, the computation ``dtype`` and the parameter ``param_dtype``."""

    def __init__(self, config: LlamaConfig, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype

    def _linear(self, features_in: int, features_out: int, use_bias: bool,
                rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(features_in, features_out, use_bias=use_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          kernel_init=nnx.initializers.normal(self.config.initializer_range),
                          bias_init=nnx.initializers.zeros_init(), rngs=rngs)

    def _sub(self) -> dict[str, Any]:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


class LlamaRMSNorm(nnx.Module):
    """:func:`rms_norm` with a learned ``scale [H]`` (initialised to ones), ``[..., H]``."""

    def __init__(self, features: int, eps: float = 1e-6, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...].astype(self.dtype), self.eps)


class LlamaAttention(_LlamaModule):
    """Grouped-query self-attention with rotary embeddings (Hugging Face ``self_attn``).

    ``q = x W_q [B, T, N, D]``, ``k = x W_k``, ``v = x W_v [B, T, K, D]``; ``q, k`` rotated by
    :func:`apply_rope`; with a cache, ``k, v`` are written at slots ``index .. index + T - 1`` of
    the layer's ``[B, S, K, D]`` cache and attention runs over all ``S`` slots;
    ``out = grouped_attention(q, k, v, allowed) W_o``: ``[B, T, H] -> [B, T, H]``.
    Hook points (:mod:`jpeft.core.marks`): ``query`` ``[B, T, N, D]``; ``keys``, ``values``
    ``[B, S, K, D]`` and ``mask`` (``allowed``, bool ``[B, T, S]``): what the attention reads
    (keys rotated; with a cache, the whole cache after this call's write, so an edit there
    never enters the cache); ``lse`` (read-only, :func:`attention_lse`, ``[B, T, N]``);
    ``context`` (``[B, T, N, D]``).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, **kw: Any):
        super().__init__(config, **kw)
        c, bias = config, config.attention_bias
        self.q_proj = self._linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias, rngs)
        self.k_proj = self._linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias, rngs)
        self.v_proj = self._linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias, rngs)
        self.o_proj = self._linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias, rngs)

    def __call__(self, hidden: Array, cos: Array, sin: Array, allowed: Array,
                 kv: LayerKV | None = None, index: Array | int = 0) -> tuple[Array, LayerKV | None]:
        c = self.config
        b, t, _ = hidden.shape
        q = self.q_proj(hidden).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(hidden).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(hidden).reshape(b, t, c.num_key_value_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = mark(q, self, "query")
        if kv is not None:
            start = (0, index, 0, 0)
            kv = LayerKV(jax.lax.dynamic_update_slice(kv.keys, k.astype(kv.keys.dtype), start),
                         jax.lax.dynamic_update_slice(kv.values, v.astype(kv.values.dtype), start))
            k, v = kv.keys.astype(q.dtype), kv.values.astype(q.dtype)
        k, v = mark(k, self, "keys"), mark(v, self, "values")
        allowed = mark(allowed, self, "mask")
        mark(attention_lse(q, k, allowed), self, "lse")           # read-only hook point
        out = mark(grouped_attention(q, k, v, allowed, c.attention), self, "context")
        return self.o_proj(out.reshape(b, t, c.num_attention_heads * c.head_dim)), kv


class LlamaMLP(_LlamaModule):
    """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``, ``[B, T, H] -> [B, T, H]`` (hook
    point ``hidden``: ``act(gate(x)) * up(x)``, ``[B, T, F]``)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, **kw: Any):
        super().__init__(config, **kw)
        c, bias = config, config.mlp_bias
        self.gate_proj = self._linear(c.hidden_size, c.intermediate_size, bias, rngs)
        self.up_proj = self._linear(c.hidden_size, c.intermediate_size, bias, rngs)
        self.down_proj = self._linear(c.intermediate_size, c.hidden_size, bias, rngs)

    def __call__(self, hidden: Array) -> Array:
        act = get_activation(self.config.hidden_act)
        return self.down_proj(mark(act(self.gate_proj(hidden)) * self.up_proj(hidden), self,
                                   "hidden"))


class LlamaDecoderLayer(_LlamaModule):
    """One pre-norm block: ``h = x + attn(norm1(x))``, ``out = h + mlp(norm2(h))``, ``[B, T, H]``.

    Returns ``(out, kv)`` with ``kv`` the layer's updated :class:`LayerKV` (``None`` without one).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, **kw: Any):
        super().__init__(config, **kw)
        c = config
        self.self_attn = LlamaAttention(c, rngs=rngs, **kw)
        self.mlp = LlamaMLP(c, rngs=rngs, **kw)
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps, **kw)

    def __call__(self, hidden: Array, cos: Array, sin: Array, allowed: Array,
                 kv: LayerKV | None = None, index: Array | int = 0) -> tuple[Array, LayerKV | None]:
        attn, kv = self.self_attn(self.input_layernorm(hidden), cos, sin, allowed, kv, index)
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), kv


class LlamaModel(_LlamaModule):
    """The decoder (Hugging Face ``LlamaModel``): embeddings, ``L`` layers, final norm.

    ``__call__(input_ids [B, T], attention_mask [B, T] | None, positions [B, T] | None, cache)``
    returns ``(hidden [B, T, H], cache)`` (``cache`` updated, or ``None`` when none was given).
    ``attention_mask`` (1 = token, 0 = padding) defaults to all ones; ``positions`` default to
    :func:`positions_from_mask` (counting from ``cache.next_position`` with a cache), so left- and
    right-padded batches get the rotary positions of their unpadded rows.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, **kw: Any):
        super().__init__(config, **kw)
        c = config
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                                      param_dtype=self.param_dtype,
                                      embedding_init=nnx.initializers.normal(c.initializer_range),
                                      rngs=rngs)
        if c.scan_layers:
            @nnx.split_rngs(splits=c.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_layers(r: nnx.Rngs) -> LlamaDecoderLayer:
                return LlamaDecoderLayer(c, rngs=r, **kw)

            self.layers = make_layers(rngs)
        else:
            self.layers = nnx.List([LlamaDecoderLayer(c, rngs=rngs, **kw)
                                    for _ in range(c.num_hidden_layers)])
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps, **kw)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 positions: Array | None = None,
                 cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
        c = self.config
        b, t = input_ids.shape
        mask = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                else jnp.asarray(attention_mask).astype(jnp.int32))
        if cache is None:
            index, start, key_mask = 0, jnp.zeros((b,), jnp.int32), mask
        else:
            index, start = cache.length, cache.next_position
            key_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, index))
        if positions is None:
            positions = positions_from_mask(mask, start)
        # hook point: the positions the rotary embedding sees (the cache counts the unmarked ones)
        cos, sin = rope_cos_sin(mark(positions, self, "positions"), c.head_dim, c.rope_theta)
        allowed = causal_mask(index + jnp.arange(t), key_mask)

        hidden = constrain(mark(self.embed_tokens(input_ids), self, "embeddings"))
        kv = None if cache is None else LayerKV(cache.keys, cache.values)
        if c.scan_layers:
            hidden, kv = self._scan_layers(hidden, cos, sin, allowed, kv, index)
        else:
            hidden, kv = self._unrolled_layers(hidden, cos, sin, allowed, kv, index)
        hidden = self.norm(hidden)
        if cache is None:
            return hidden, None
        next_position = jnp.max(jnp.where(mask.astype(bool), positions, start[:, None] - 1),
                                axis=-1) + 1
        return hidden, KVCache(kv.keys, kv.values, key_mask, cache.length + t,
                               next_position.astype(jnp.int32))

    def _unrolled_layers(self, hidden, cos, sin, allowed, kv, index):
        """A Python loop over the ``nnx.List``; layer ``i`` reads and rewrites ``kv[:, i]``."""
        call = self._layer_call()
        for i, layer in enumerate(self.layers):
            layer_kv = None if kv is None else LayerKV(kv.keys[i], kv.values[i])
            hidden, layer_kv = call(layer, hidden, cos, sin, allowed, layer_kv, index)
            hidden = constrain(hidden)
            if kv is not None:
                kv = LayerKV(kv.keys.at[i].set(layer_kv.keys), kv.values.at[i].set(layer_kv.values))
        return hidden, kv

    def _scan_layers(self, hidden, cos, sin, allowed, kv, index):
        """``nnx.scan`` over the stacked layer and the ``[L, ...]`` cache (hidden state carried)."""
        call = self._layer_call()

        @nnx.scan(in_axes=(nnx.Carry, 0, 0, None, None, None, None), out_axes=(nnx.Carry, 0))
        def run(h, layer, layer_kv, cos, sin, allowed, index):
            h, layer_kv = call(layer, h, cos, sin, allowed, layer_kv, index)
            return constrain(h), layer_kv

        return run(hidden, self.layers, kv, cos, sin, allowed, index)

    def _layer_call(self):
        """``(layer, hidden, cos, sin, allowed, kv, index) -> (hidden, kv)``: one layer, under
        ``nnx.remat`` with the policy of ``config.remat`` (:data:`REMAT_POLICIES`)."""
        def call(layer, hidden, cos, sin, allowed, kv, index):
            return layer(hidden, cos, sin, allowed, kv, index)
        policy = REMAT_POLICIES[self.config.remat]
        return call if policy is None else nnx.remat(call, policy=policy)


class LlamaForCausalLM(_LlamaModule):
    """The causal language model (Hugging Face ``LlamaForCausalLM``): ``model`` and ``lm_head``.

    ``logits = LlamaModel(...) W_lm`` (``[B, T, V]``), or ``h @ embed_tokens.embedding.T`` when
    ``tie_word_embeddings`` (then there is no ``lm_head``).

    ``__call__(input_ids, attention_mask=None, positions=None, cache=None)`` returns ``logits``
    without a cache and ``(logits, new_cache)`` with one (see :class:`LlamaModel` and
    :class:`KVCache`). ``rngs`` only initialises parameters (``normal(initializer_range)`` for
    linear maps and embeddings, ones for norms, zeros for biases); it defaults to ``nnx.Rngs(0)``.
    """

    def __init__(self, config: LlamaConfig, *, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs | None = None):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype)
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.model = LlamaModel(config, rngs=rngs, **self._sub())
        if not config.tie_word_embeddings:
            self.lm_head = self._linear(config.hidden_size, config.vocab_size, False, rngs)

    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 positions: Array | None = None,
                 cache: KVCache | None = None) -> Array | tuple[Array, KVCache]:
        hidden, new_cache = self.model(input_ids, attention_mask, positions, cache)
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = constrain(logits)
        return logits if cache is None else (logits, new_cache)


# --------------------------------------------------------------------------- generation


@nnx.jit(static_argnames=("max_new_tokens", "top_k", "cache_dtype"))
def _generate(model: LlamaForCausalLM, input_ids: Array, attention_mask: Array, key: Array,
              temperature: Array, eos_token_id: Array, pad_token_id: Array, *,
              max_new_tokens: int, top_k: int | None, cache_dtype: Any) -> Array:
    """:func:`generate`'s program; ``eos_token_id = -1`` means none. The temperature (0 = greedy),
    the key and the eos/pad ids are traced: changing them does not recompile."""
    b, t = input_ids.shape
    cache = init_cache(model.config, b, t + max_new_tokens - 1, cache_dtype)
    logits, cache = model(input_ids, attention_mask, cache=cache)
    last = last_real_index(attention_mask)
    logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
    ones = jnp.ones((b, 1), jnp.int32)
    graphdef, state = nnx.split(model)
    state = nnx.as_pure(state)  # plain arrays: re-merged at the loop body's trace level

    def pick(logits, done, i):
        token = select_token(logits, jax.random.fold_in(key, i), temperature, top_k=top_k)
        token = jnp.where(done, pad_token_id, token)
        return token, done | (token == eos_token_id)

    def step(carry, i):
        logits, cache, done = carry
        token, done = pick(logits, done, i)
        logits, cache = nnx.merge(graphdef, state)(token[:, None], ones, cache=cache)
        return (logits[:, -1], cache, done), token

    init = (logits, cache, jnp.zeros((b,), bool))
    (logits, _, done), tokens = jax.lax.scan(step, init, jnp.arange(max_new_tokens - 1))
    last_token, _ = pick(logits, done, max_new_tokens - 1)
    tokens = jnp.concatenate([tokens.T, last_token[:, None]], axis=1)
    return jnp.concatenate([input_ids, tokens.astype(input_ids.dtype)], axis=1)


def generate(model: LlamaForCausalLM, input_ids: Array, attention_mask: Array | None = None,
             max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int | None = None,
             key: Array | None = None, eos_token_id: int | None = None, pad_token_id: int = 0,
             cache_dtype: Dtype | None = None) -> Array:
    """Continue ``input_ids [B, T]`` by ``max_new_tokens`` tokens: returns ``[B, T + N]`` int32.

    One jitted program: a prefill of the prompt into a :class:`KVCache` of ``T + N - 1`` slots,
    then a ``lax.scan`` of ``N - 1`` one-token steps (each picks a token and feeds it back).
    Prompts may be left- or right-padded (``attention_mask`` 0 on padding; rotary positions come
    from the mask, the first new token is predicted from each row's last real token).
    ``temperature == 0`` is greedy (argmax); otherwise tokens are sampled from
    ``softmax(logits / temperature)`` (over the ``top_k`` largest when given) with
    ``jax.random.fold_in(key, step)``, so a fixed ``key`` is reproducible (see
    :func:`select_token`). After a row emits ``eos_token_id`` it emits ``pad_token_id``.
    ``cache_dtype`` defaults to the model's computation dtype. Recompiles only for new shapes,
    ``max_new_tokens``, ``top_k``, ``cache_dtype`` or model structure.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = (jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None
            else jnp.asarray(attention_mask, jnp.int32))
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return input_ids
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a jax.random key")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, {model.config.vocab_size}], got {top_k}")
    key = jax.random.key(0) if key is None else key
    return _generate(model, input_ids, mask, key, jnp.float32(temperature),
                     jnp.int32(-1 if eos_token_id is None else eos_token_id),
                     jnp.int32(pad_token_id), max_new_tokens=max_new_tokens, top_k=top_k,
                     cache_dtype=jnp.dtype(cache_dtype or model.dtype))


# --------------------------------------------------------------------------- Hugging Face state


class _Target(NamedTuple):
    """Where one Hugging Face tensor goes: the NNX parameter path, the layer index along the
    leading axis of a scanned parameter (``None`` when unstacked), whether to transpose, and the
    Hugging Face shape."""

    path: tuple
    layer: int | None
    transpose: bool
    hf_shape: tuple[int, ...]


_HF_LEAF = {"kernel": ("weight", True), "embedding": ("weight", False),
            "scale": ("weight", False), "bias": ("bias", False)}


def _param_variables(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Variable]]:
    yield from nnx.to_flat_state(nnx.state(model, nnx.Param))


def _hf_targets(model: LlamaForCausalLM) -> dict[str, _Target]:
    """``{hf_key: _Target}`` for every parameter of ``model`` (every layer of a scanned stack)."""
    scanned = model.config.scan_layers
    out = {}
    for path, var in _param_variables(model):
        *module, leaf = (str(p) for p in path)
        hf_leaf, transpose = _HF_LEAF[leaf]
        shape = tuple(var.shape)
        if scanned and module[:2] == ["model", "layers"]:
            layer_shape = shape[1:][::-1] if transpose else shape[1:]
            for i in range(shape[0]):
                key = ".".join(["model", "layers", str(i)] + module[2:] + [hf_leaf])
                out[key] = _Target(path, i, transpose, layer_shape)
        else:
            out[".".join(module + [hf_leaf])] = _Target(path, None, transpose,
                                                        shape[::-1] if transpose else shape)
    return out


def hf_param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``{hf_key: shape}`` of every tensor :func:`load_hf_llama` expects for ``config`` (Hugging
    Face shapes, e.g. ``[out, in]`` for linear weights; no ``lm_head.weight`` when tied). Builds
    no parameters."""
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config))
    return {k: t.hf_shape for k, t in _hf_targets(model).items()}


def _read_safetensors(path: pathlib.Path) -> dict[str, Array]:
    """All tensors of one ``.safetensors`` file as jax arrays (bfloat16 included)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="flax") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _resolve_source(source: Mapping[str, Any] | str | os.PathLike,
                    config: LlamaConfig | None) -> tuple[Mapping[str, Any], LlamaConfig]:
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("load_hf_llama needs a config when given a state dict")
        return source, config
    path = pathlib.Path(source)
    if path.is_dir():
        if config is None:
            config = LlamaConfig.from_json_file(path / "config.json")
        index = path / "model.safetensors.index.json"
        if (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        elif index.is_file():
            with open(index, encoding="utf-8") as f:
                files = [path / n for n in sorted(set(json.load(f)["weight_map"].values()))]
        else:
            raise FileNotFoundError(f"no model.safetensors(.index.json) in {path}")
    elif path.is_file():
        if config is None:
            raise ValueError(f"load_hf_llama needs a config for the single file {path}")
        files = [path]
    else:
        raise FileNotFoundError(f"no such file or directory: {path}")
    state: dict[str, Array] = {}
    for f in files:
        state.update(_read_safetensors(f))
    return state, config


#: The error of a tied model's checkpoint whose head is not its embedding.
TIED_HEAD_DIFFERS = ("'lm_head.weight' differs from 'model.embed_tokens.weight' but "
                     "tie_word_embeddings=True; load with tie_word_embeddings=False")


def load_hf_llama(source: Mapping[str, Any] | str | os.PathLike, config: LlamaConfig | None = None,
                  *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                  scan_layers: bool | None = None) -> LlamaForCausalLM:
    """Build a :class:`LlamaForCausalLM` from a Hugging Face LLaMA state dict.

    Args:
      source: ``{key: array}`` in safetensors naming (numpy arrays, jax arrays, or anything
        ``np.asarray`` takes, e.g. ``{k: v.numpy() for k, v in torch_model.state_dict().items()}``),
        a ``.safetensors`` file, or a directory with ``config.json`` and ``model.safetensors`` (or
        a sharded ``model.safetensors.index.json``).
      config: the model's config; read from ``config.json`` when ``None`` and ``source`` is a
        directory.
      scan_layers: overrides ``config.scan_layers``; either layout loads from the same keys
        (``model.layers.{i}.*`` are stacked along the leading axis of a scanned model).

    Keys map as ``a.b.weight -> a/b/kernel = weight.T`` for linear maps, ``-> embedding`` for
    ``embed_tokens`` and ``-> scale`` for norms; ``bias -> bias``. ``*.rotary_emb.inv_freq``
    buffers are ignored, and so is ``lm_head.weight`` of a tied model when it equals the
    embedding. Tensors are cast to ``param_dtype``; parameters are never randomly initialised.
    Every tensor is read whole onto the default device; to read each device's slice straight onto
    a mesh (bfloat16 kept), see :func:`jpeft.models.sharded_loading.load_hf_llama_sharded`.

    Raises:
      ValueError: naming the key, on a shape mismatch, on any missing or unexpected key (all of
        them listed), or on an ``lm_head.weight`` that differs from the tied embedding.
    """
    state, config = _resolve_source(source, config)
    if scan_layers is not None:
        config = dataclasses.replace(config, scan_layers=scan_layers)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=param_dtype))
    targets = _hf_targets(model)

    values: dict[tuple, dict[int | None, Any]] = {}
    unexpected = []
    for key, value in state.items():
        if key.endswith(IGNORED_HF_SUFFIXES):
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings and key not in targets:
            embed = state.get("model.embed_tokens.weight")
            if embed is not None and not np.array_equal(np.asarray(value), np.asarray(embed)):
                raise ValueError(TIED_HEAD_DIFFERS)
            continue
        target = targets.get(key)
        if target is None:
            unexpected.append(key)
            continue
        if not isinstance(value, jax.Array):
            value = np.asarray(value)
        if tuple(value.shape) != target.hf_shape:
            raise ValueError(f"shape mismatch for {key!r} (-> {'/'.join(map(str, target.path))}): "
                             f"the checkpoint has {tuple(value.shape)}, the model expects "
                             f"{target.hf_shape}" + (" (kernel = weight.T)" if target.transpose
                                                     else ""))
        values.setdefault(target.path, {})[target.layer] = value.T if target.transpose else value
    missing = [k for k, tg in targets.items() if tg.layer not in values.get(tg.path, {})]
    if missing or unexpected:
        raise ValueError(f"cannot load the LLaMA state dict: missing keys {missing}, "
                         f"unexpected keys {sorted(unexpected)}")

    for path, var in _param_variables(model):
        parts = values[path]
        if None in parts:
            x = parts[None]
        else:  # a scanned stack: layer i at index i of the leading axis
            xp = jnp if any(isinstance(v, jax.Array) for v in parts.values()) else np
            x = xp.stack([parts[i] for i in range(len(parts))])
        var.set_value(jnp.asarray(x, dtype=var.dtype))
    return model


def llama_to_hf_state(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_hf_llama`: ``{hf_key: np.ndarray}`` (C-contiguous, the params'
    dtype) for every parameter; scanned stacks are split into ``model.layers.{i}.*``; a tied model
    has no ``lm_head.weight`` (as in its safetensors file)."""
    values = {path: np.asarray(var[...]) for path, var in _param_variables(model)}
    out = {}
    for key, target in _hf_targets(model).items():
        x = values[target.path]
        x = x if target.layer is None else x[target.layer]
        out[key] = np.ascontiguousarray(x.T if target.transpose else x)
    return out


def convert_layers(model: LlamaForCausalLM, scan_layers: bool) -> LlamaForCausalLM:
    """The same weights in the other layer layout (unrolled ``<->`` scanned ``[L, ...]``)."""
    return load_hf_llama(llama_to_hf_state(model), model.config, dtype=model.dtype,
                         param_dtype=model.param_dtype, scan_layers=scan_layers)


__all__ = [
    "IGNORED_HF_SUFFIXES", "KVCache", "LayerKV", "LlamaAttention", "LlamaConfig",
    "LlamaDecoderLayer", "LlamaForCausalLM", "LlamaMLP", "LlamaModel", "LlamaRMSNorm",
    "SUPPORTED_ROPE_TYPES", "apply_rope", "causal_mask", "convert_layers", "generate",
    "grouped_attention", "hf_param_shapes", "init_cache", "last_real_index", "llama_to_hf_state",
    "load_hf_llama", "positions_from_mask", "rms_norm", "rope_cos_sin", "rope_inv_freq",
    "rotate_half", "select_token",
]
