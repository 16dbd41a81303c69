"""Tiny models in every style a user brings, for the contract suite (``tests/test_contract.py``).

Each :class:`Style` is a pure ``apply(params, *args)`` with its parameters and example inputs:
jpeft's linen BERT; flax's own ``nn.MultiHeadDotProductAttention`` (3-D DenseGeneral kernels);
Gemma-style ``nn.Einsum`` projections (including a stacked key/value einsum whose weight is
contracted over a middle axis); ``nn.scan(nn.remat(block))`` (kernels ``[L, in, out]``); a conv
net; NNX ``nnx.Linear``/``nnx.MultiHeadAttention``; the NNX LLaMA-style decoder, unrolled and
scanned. ``ffn`` is a regex of each style's 2-D feed-forward matrices (FAR's targets), ``None``
where it has none.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jpeft


class Style(NamedTuple):
    name: str
    apply: Callable[..., Any]
    params: Any
    args: tuple
    ffn: str | None = None


# --------------------------------------------------------------------------------------------
# linen


class _MHABlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16, name="attn")(x, x)
        h = nn.Dense(32, name="up")(nn.LayerNorm(name="norm")(x))
        return nn.Dense(3, name="head")(x + nn.Dense(16, name="down")(jax.nn.gelu(h)))


class _EinsumBlock(nn.Module):
    """Gemma-style projections: q ``[D, N, H]``, stacked k/v ``[S=2, N, D, H]`` (contracted over
    its third axis), output ``[N, H, D]``."""
    @nn.compact
    def __call__(self, x):
        q = nn.Einsum((16, 2, 8), "btd,dnh->btnh", name="q")(x)
        k, v = nn.Einsum((2, 2, 16, 8), "btd,sndh->sbtnh", use_bias=False, name="kv")(x)
        w = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(8.0), axis=-1)
        ctx = jnp.einsum("bnts,bsnh->btnh", w, v)
        return x + nn.Einsum((2, 8, 16), "btnh,nhd->btd", name="o")(ctx)


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = jax.nn.gelu(nn.Dense(32, name="up")(nn.LayerNorm(name="norm")(x)))
        return x + nn.Dense(16, name="down")(h), None


class _ScanNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(nn.remat(_ScanBlock), variable_axes={"params": 0},
                        split_rngs={"params": True}, length=3)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(3, name="head")(x)


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        h = jax.nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="conv2")(h))
        return nn.Dense(3, name="head")(h.mean(axis=(1, 2)))


def _linen(name, module, x, ffn=None) -> Style:
    variables = module.init(jax.random.key(0), x)
    return Style(name, module.apply, variables, (x,), ffn)


# --------------------------------------------------------------------------------------------
# NNX


class _NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16,
                                           decode=False, rngs=rngs)
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return self.head(x + self.down(jax.nn.gelu(self.up(x))))


def _nnx(name, module, args, ffn=None) -> Style:
    apply, params = jpeft.nnx.split(module)
    return Style(name, apply, params, args, ffn)


def _decoder(scan: bool) -> Style:
    from jpeft.models.llama import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_attention_heads=4, num_key_value_heads=2,
                              attention_bias=True, scan_layers=scan)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(0).integers(1, 64, (2, 6)).astype(np.int32)
    ffn = r".*mlp/(gate_proj|up_proj|down_proj)" if not scan else None
    return _nnx("nnx_decoder_scan" if scan else "nnx_decoder", model, (ids,), ffn)


def _bert() -> Style:
    from jpeft.models.bert import BertConfig, BertForSequenceClassification
    model = BertForSequenceClassification(BertConfig.tiny(num_labels=2, pooling="mean"))
    ids = np.random.default_rng(0).integers(1, 100, (2, 6)).astype(np.int32)
    variables = model.init(jax.random.key(0), ids)
    mask, types = np.ones_like(ids), np.zeros_like(ids)
    return Style("linen_bert", model.apply, variables, (ids, mask, types),
                 r".*layer/[0-9]+/(intermediate|output)/dense")


def build(name: str) -> Style:
    """The style called ``name`` (one of :data:`NAMES`)."""
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    if name == "linen_bert":
        return _bert()
    if name == "linen_mha":
        return _linen(name, _MHABlock(), x, r".*(up|down)")
    if name == "linen_einsum":
        return _linen(name, _EinsumBlock(), x)
    if name == "linen_scan_remat":
        return _linen(name, _ScanNet(), x)
    if name == "linen_conv":
        return _linen(name, _ConvNet(), jax.random.normal(jax.random.key(1), (2, 8, 8, 3)))
    if name == "nnx_mha":
        return _nnx(name, _NNXBlock(nnx.Rngs(0)), (x,), r".*(up|down)")
    if name == "nnx_decoder":
        return _decoder(scan=False)
    if name == "nnx_decoder_scan":
        return _decoder(scan=True)
    raise ValueError(name)


NAMES = ("linen_bert", "linen_mha", "linen_einsum", "linen_scan_remat", "linen_conv", "nnx_mha",
         "nnx_decoder", "nnx_decoder_scan")
