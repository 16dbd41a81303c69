"""A BERT-family encoder in Flax linen whose parameter tree mirrors Hugging Face names.

The module tree is the one of ``transformers.BertModel``: every parameter's module path, joined with
``"."``, is the Hugging Face state-dict key without its leaf name, e.g.::

    params["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
        <->  "encoder.layer.0.attention.self.query.weight"   (kernel = weight.T)

Leaf names are Flax's: ``kernel`` (``[in, out]``, the transpose of a ``torch.nn.Linear`` weight),
``bias``, ``embedding`` and, for layer norms, ``scale``/``bias``. Converting between the two is the
job of :mod:`jpeft.models.loading`.

Every linear map is a :class:`Dense` and every layer norm a :class:`LayerNorm`: flax's own
modules (same fields, parameters and values; a kernel is the weight of one contraction site,
:func:`jpeft.probe`) differentiated on flattened tokens (:mod:`jpeft.ops.flat_tokens`), which
XLA:CPU runs faster. Every Hugging Face block is its own module.

Shapes: ``B`` batch, ``T`` sequence length, ``H`` hidden size, ``N`` heads, ``D = H / N`` head size,
``I`` intermediate size, ``L`` number of layers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jpeft.core.marks import mark
from jpeft.models.hf_config import HFConfig
from jpeft.ops.flat_tokens import per_token

Array = jax.Array
Dtype = Any

POOLINGS = ("cls", "mean")


def gelu(x: Array) -> Array:
    """Exact GELU, ``x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))`` (Hugging Face ``"gelu"``).

    Written with ``erf``, as PyTorch computes it, not as ``jax.nn.gelu(approximate=False)``'s
    ``0.5 * x * erfc(-x / sqrt(2))``: XLA's ``erfc`` is a piecewise exp-and-polynomial with
    selects, about 1.7x the time of the forward and backward pass on XLA:CPU
    (``benchmarks/README.md``), for an accuracy gain only where ``Phi(x) < 1e-7`` (``x < -5``)."""
    half = jnp.asarray(0.5, x.dtype)
    return half * x * (1 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


def gelu_tanh(x: Array) -> Array:
    """Tanh GELU, ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))`` (``"gelu_new"``)."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation function for a Hugging Face ``hidden_act`` name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


@dataclasses.dataclass(frozen=True)
class BertConfig(HFConfig):
    """Hyper-parameters of a BERT encoder, named as in a Hugging Face ``config.json``.

    ``num_labels``, ``pooling`` and ``classifier_dropout`` configure the heads:

    * ``pooling="cls"``: ``pooled = tanh(W h[:, 0] + b)``, Hugging Face's ``BertPooler``
      (parameters ``pooler/dense``);
    * ``pooling="mean"``: ``pooled = sum_t m_t h_t / max(sum_t m_t, 1e-9)`` with ``m`` the attention
      mask, the sentence-transformers mean pooling (no parameters);
    * ``pooling=None``: no pooled output (``BertModel`` only).

    ``classifier_dropout=None`` means ``hidden_dropout_prob`` (as in Hugging Face).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    num_labels: int = 2
    pooling: str | None = "cls"
    classifier_dropout: float | None = None

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} or None, got {self.pooling!r}")
        get_activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "BertConfig":
        """Config from a Hugging Face config dict; unknown keys are ignored, ``overrides`` win.

        ``num_labels`` is taken from ``num_labels`` or, failing that, from ``id2label`` when present.
        """
        d = dict(d)
        if "num_labels" not in d and isinstance(d.get("id2label"), dict):
            d["num_labels"] = len(d["id2label"])
        return cls._build(d, overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "BertConfig":
        """A 2-layer, 32-wide config for tests (vocab 100, 4 heads, intermediate 64, 64 positions)."""
        base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64)
        base.update(overrides)
        return cls(**base)


class EncoderOutput(NamedTuple):
    """What :class:`BertModel` returns.

    ``last_hidden_state``: ``[B, T, H]``; ``pooled``: ``[B, H]`` or ``None`` when ``pooling=None``;
    ``hidden_states``: ``L + 1`` arrays ``[B, T, H]`` (embedding output first, then every layer's
    output, as in Hugging Face) when ``output_hidden_states=True``, else ``None``.
    """

    last_hidden_state: Array
    pooled: Array | None = None
    hidden_states: tuple[Array, ...] | None = None


def attention_bias(attention_mask: Array, dtype: Dtype) -> Array:
    """Additive key bias ``[B, 1, 1, T]`` from a ``[B, T]`` mask (1 = attend, 0 = padding).

    ``bias = (1 - mask) * finfo(dtype).min``, as Hugging Face's extended attention mask.
    """
    mask = attention_mask.astype(dtype)
    return ((1.0 - mask) * jnp.finfo(dtype).min)[:, None, None, :]


def masked_mean(hidden: Array, attention_mask: Array) -> Array:
    """Mean over real tokens: ``[B, T, H], [B, T] -> [B, H]``, ``sum_t m_t h_t / max(sum_t m_t, 1e-9)``."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


#: Rematerialisation policies for ``remat=`` (names in ``jax.checkpoint_policies``).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "everything_saveable")


def _lift(p: Array, ndim: int) -> Array:
    """A ``[F]`` parameter as ``[1, ..., 1, F]`` (``ndim`` axes), as flax broadcasts it."""
    return p.reshape((1,) * (ndim - 1) + (-1,))


def _contract_last(x: Array, w: Array, precision) -> Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


class Dense(nn.Dense):
    """:class:`flax.linen.Dense` (same fields, parameters and values: ``y = x W + b`` over the last
    axis, ``W [in, out]``), differentiated on flattened tokens (:func:`jpeft.ops.flat_tokens.per_token`)."""

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if bias is None:
            return per_token(lambda x, w: _contract_last(x, w, self.precision))(inputs, kernel)
        return per_token(lambda x, w, b: _contract_last(x, w, self.precision) + _lift(b, x.ndim))(
            inputs, kernel, bias)


class LayerNorm(nn.LayerNorm):
    """:class:`flax.linen.LayerNorm` over the last axis (same parameters and values:
    ``y = (x - mean) * (scale / sqrt(var + eps)) + bias``, ``var = mean(x^2) - mean^2`` clipped at
    0, statistics and affine in ``float32``, the result in ``dtype``), differentiated on flattened
    tokens (:func:`jpeft.ops.flat_tokens.per_token`). Honours ``epsilon``, ``dtype``,
    ``param_dtype``, ``use_scale``, ``use_bias`` and the initialisers; the other fields keep
    their defaults (last-axis reduction, no mask)."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = x.shape[-1]
        params = []
        if self.use_scale:
            params.append(self.param("scale", self.scale_init, (h,), self.param_dtype))
        if self.use_bias:
            params.append(self.param("bias", self.bias_init, (h,), self.param_dtype))
        dtype = self.dtype or jnp.result_type(x, *params)
        use_scale, eps = self.use_scale, self.epsilon

        def norm(x, *p):
            xf = x.astype(jnp.float32)
            mean, mean_sq = xf.mean(-1), jax.lax.square(xf).mean(-1)
            var = jnp.maximum(0.0, mean_sq - jax.lax.square(mean))
            mean, mul = mean[..., None], jax.lax.rsqrt(var[..., None] + eps)
            p = list(p)
            if use_scale:
                mul = mul * _lift(p.pop(0), x.ndim).astype(jnp.float32)
            y = (xf - mean) * mul
            if p:
                y = y + _lift(p.pop(0), x.ndim).astype(jnp.float32)
            return y.astype(dtype)
        return per_token(norm)(x, *params)


class _BertModule(nn.Module):
    """Shared fields: the config, the computation ``dtype``, the parameter ``param_dtype`` and
    ``remat``: ``None``, or a policy of :data:`REMAT_POLICIES` under which every layer is
    rematerialised (``nn.remat``: its activations not named by the policy are recomputed in the
    backward pass instead of kept; the parameter tree is unchanged)."""

    config: BertConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str | None = None

    def _sub(self) -> dict[str, Any]:
        return dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype,
                    remat=self.remat)

    def _dense(self, features: int, name: str) -> Dense:
        return Dense(features, dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.normal(self.config.initializer_range),
                     bias_init=nn.initializers.zeros, name=name)

    def _layer_norm(self, name: str = "LayerNorm") -> LayerNorm:
        return LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)

    def _embed(self, num: int, name: str) -> nn.Embed:
        return nn.Embed(num, self.config.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                        embedding_init=nn.initializers.normal(self.config.initializer_range), name=name)


class BertEmbeddings(_BertModule):
    """``LayerNorm(E_word[ids] + E_pos[0..T-1] + E_type[type_ids])`` then dropout: ``[B, T] -> [B, T, H]``
    (hook point ``positions``: the position ids ``[1, T]``)."""

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array, *, deterministic: bool = True) -> Array:
        c = self.config
        t = input_ids.shape[-1]
        positions = mark(jnp.arange(t)[None, :], self, "positions")
        x = (self._embed(c.vocab_size, "word_embeddings")(input_ids)
             + self._embed(c.max_position_embeddings, "position_embeddings")(positions)
             + self._embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
        x = self._layer_norm()(x)
        return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(_BertModule):
    """Multi-head scaled dot-product attention (Hugging Face ``attention.self``).

    ``q, k, v = x W_q + b_q, x W_k + b_k, x W_v + b_v`` split into ``N`` heads ``[B, T, N, D]``;
    ``P = softmax(q k^T / sqrt(D) + bias)`` over keys (computed in float32), dropout on ``P``;
    output ``P v`` merged back to ``[B, T, H]``. ``bias`` is :func:`attention_bias` of the mask.
    Hook points (:mod:`jpeft.core.marks`, scoped by this module's path): ``query``, ``keys``,
    ``values`` ``[B, T, N, D]``, ``mask`` (the bias ``[B, 1, 1, T]``), ``scores`` (``[B, N, T, T]``,
    float32, masked, before the softmax), ``lse`` (read-only: ``logsumexp`` of the scores over
    the keys, ``[B, T, N]``), ``context`` (``P v``, ``[B, T, N, D]``).
    """

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array, *, deterministic: bool = True) -> Array:
        c = self.config
        b, t, _ = hidden.shape
        split = lambda y: y.reshape(b, t, c.num_attention_heads, c.head_dim)
        q = mark(split(self._dense(c.hidden_size, "query")(hidden)), self, "query")
        k = mark(split(self._dense(c.hidden_size, "key")(hidden)), self, "keys")
        v = mark(split(self._dense(c.hidden_size, "value")(hidden)), self, "values")
        bias = mark(attention_bias(attention_mask, jnp.float32), self, "mask")
        scores = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(c.head_dim)
        scores = mark(scores.astype(jnp.float32) + bias, self, "scores")
        mark(jax.nn.logsumexp(scores, axis=-1).transpose(0, 2, 1), self, "lse")   # read-only
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = nn.Dropout(c.attention_probs_dropout_prob)(probs, deterministic=deterministic)
        ctx = mark(jnp.einsum("bnqk,bknd->bqnd", probs, v), self, "context")
        return ctx.reshape(b, t, c.hidden_size)


class BertSelfOutput(_BertModule):
    """``LayerNorm(dropout(ctx W + b) + residual)``: ``[B, T, H], [B, T, H] -> [B, T, H]``."""

    @nn.compact
    def __call__(self, hidden: Array, residual: Array, *, deterministic: bool = True) -> Array:
        c = self.config
        h = self._dense(c.hidden_size, "dense")(hidden)
        h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
        return self._layer_norm()(h + residual)


class BertAttention(_BertModule):
    """Self-attention followed by its output block (``attention.self`` and ``attention.output``)."""

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array, *, deterministic: bool = True) -> Array:
        ctx = BertSelfAttention(**self._sub(), name="self")(hidden, attention_mask,
                                                            deterministic=deterministic)
        return BertSelfOutput(**self._sub(), name="output")(ctx, hidden, deterministic=deterministic)


class BertIntermediate(_BertModule):
    """``act(x W + b)``: ``[B, T, H] -> [B, T, I]`` (hook point ``hidden``)."""

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        c = self.config
        h = get_activation(c.hidden_act)(self._dense(c.intermediate_size, "dense")(hidden))
        return mark(h, self, "hidden")


class BertOutput(_BertModule):
    """``LayerNorm(dropout(x W + b) + residual)``: ``[B, T, I], [B, T, H] -> [B, T, H]``."""

    @nn.compact
    def __call__(self, hidden: Array, residual: Array, *, deterministic: bool = True) -> Array:
        c = self.config
        h = self._dense(c.hidden_size, "dense")(hidden)
        h = nn.Dropout(c.hidden_dropout_prob)(h, deterministic=deterministic)
        return self._layer_norm()(h + residual)


class BertLayer(_BertModule):
    """One post-LN transformer block: attention then feed-forward, ``[B, T, H] -> [B, T, H]``
    (``deterministic`` may be positional: ``nn.remat`` takes it as a static argument)."""

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array, deterministic: bool = True) -> Array:
        a = BertAttention(**self._sub(), name="attention")(hidden, attention_mask,
                                                           deterministic=deterministic)
        i = BertIntermediate(**self._sub(), name="intermediate")(a)
        return BertOutput(**self._sub(), name="output")(i, a, deterministic=deterministic)


class BertLayerStack(_BertModule):
    """The ``L`` layers as children ``"0" .. "L-1"`` (the counterpart of ``encoder.layer``, a
    ``torch.nn.ModuleList``). Returns the last output and every layer's output."""

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array, *,
                 deterministic: bool = True) -> tuple[Array, tuple[Array, ...]]:
        layer = BertLayer
        if self.remat is not None:
            if self.remat not in REMAT_POLICIES:
                raise ValueError(f"remat must be None or one of {REMAT_POLICIES}, got "
                                 f"{self.remat!r}")
            layer = nn.remat(BertLayer, policy=getattr(jax.checkpoint_policies, self.remat),
                             static_argnums=(3,))
        outputs = []
        for i in range(self.config.num_hidden_layers):
            hidden = layer(**self._sub(), name=str(i))(hidden, attention_mask, deterministic)
            outputs.append(hidden)
        return hidden, tuple(outputs)


class BertEncoder(_BertModule):
    """``L`` stacked :class:`BertLayer` under ``encoder/layer/{i}``: ``[B, T, H] -> [B, T, H]``,
    plus the tuple of the ``L`` layer outputs."""

    @nn.compact
    def __call__(self, hidden: Array, attention_mask: Array, *,
                 deterministic: bool = True) -> tuple[Array, tuple[Array, ...]]:
        return BertLayerStack(**self._sub(), name="layer")(hidden, attention_mask,
                                                           deterministic=deterministic)


class BertPooler(_BertModule):
    """Hugging Face pooler: ``tanh(h[:, 0] W + b)``, ``[B, T, H] -> [B, H]``."""

    @nn.compact
    def __call__(self, hidden: Array) -> Array:
        return jnp.tanh(self._dense(self.config.hidden_size, "dense")(hidden[:, 0]))


class BertModel(_BertModule):
    """The BERT encoder (Hugging Face ``BertModel``), returning an :class:`EncoderOutput`.

    Inputs are ``[B, T]`` integer arrays; ``attention_mask`` (1 = real token, 0 = padding) and
    ``token_type_ids`` default to all ones and all zeros. ``T <= max_position_embeddings``.
    Dropout draws from the ``'dropout'`` rng stream when ``deterministic=False``. Hook point
    ``embeddings``: what the encoder receives, ``[B, T, H]``.
    """

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, *, deterministic: bool = True,
                 output_hidden_states: bool = False) -> EncoderOutput:
        c = self.config
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        x = BertEmbeddings(**self._sub(), name="embeddings")(input_ids, token_type_ids,
                                                             deterministic=deterministic)
        x = mark(x, self, "embeddings")
        h, layer_outputs = BertEncoder(**self._sub(), name="encoder")(x, attention_mask,
                                                                      deterministic=deterministic)
        if c.pooling == "cls":
            pooled = BertPooler(**self._sub(), name="pooler")(h)
        elif c.pooling == "mean":
            pooled = masked_mean(h, attention_mask)
        else:
            pooled = None
        hidden_states = (x,) + layer_outputs if output_hidden_states else None
        return EncoderOutput(h, pooled, hidden_states)


class BertForSequenceClassification(_BertModule):
    """``logits = dropout(pooled) W + b``, ``[B, T] -> [B, num_labels]``, with the encoder under
    ``bert/`` and the head under ``classifier/`` (Hugging Face naming)."""

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, *, deterministic: bool = True) -> Array:
        c = self.config
        if c.pooling is None:
            raise ValueError("BertForSequenceClassification needs pooling='cls' or 'mean'")
        out = BertModel(**self._sub(), name="bert")(input_ids, attention_mask, token_type_ids,
                                                   deterministic=deterministic)
        rate = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
        pooled = nn.Dropout(rate)(out.pooled, deterministic=deterministic)
        return self._dense(c.num_labels, "classifier")(pooled)
