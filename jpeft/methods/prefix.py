"""Prefix tuning (Li & Liang, 2021): learned keys and values prepended to every attention.

Per attention layer, ``l`` learned vectors ``P_k, P_v: [l, K, D]`` (``K`` key/value heads of size
``D``) are prepended to the keys and values, and every query may attend to them (bidirectional or
causal, with or without a KV cache)::

    out_t = softmax([q_t P_k^T, q_t k^T] * c + [0, bias]) [P_v; v]            (c = 1/sqrt(D))

jpeft computes this without changing any shape in the model: with ``logsumexp(s)`` the
log-normaliser of the model's own masked scores of query ``t`` (the read-only ``lse`` hook point,
which a model with a fused attention such as ``jax.nn.dot_product_attention`` computes beside
it), ``p = c q_t P_k^T`` the prefix scores and ``ctx`` the model's own output (the ``context``
hook point), softmax over the concatenation splits exactly as (He et al., 2022, eq. 5)::

    out_t = lam * ctx + (1 - lam) * softmax(p) P_v,   lam = sigmoid(logsumexp(s) - logsumexp(p))

(``lam`` is the share of the attention mass on the model's own keys). The prefix sits ahead of
the tokens, so the tokens' positions start at ``l`` (``shift_positions``; the ``positions`` hook
point), as in the paper's and Hugging Face PEFT's implementation, where the prefix fills the first
``l`` slots of the key/value cache. So the prefix works wherever
the model marks ``query``, ``keys``, ``lse`` and ``context`` (:mod:`jpeft.core.marks`; jpeft's BERT and
LLaMA do), the KV cache needs no room for it, and generation with a cache equals generation
without. Grouped-query attention: query head ``n`` reads prefix head ``n // (N / K)``. A model's
attention dropout (on its own probabilities) is not applied to the prefix share; in evaluation the
two forms are equal.

Two parametrisations (``reparametrize``):

* direct: the delta holds ``prefix_keys``, ``prefix_values`` ``[*L, l, K, D]`` at each
  attention's scope path (``[L]`` for a layer-stacked model);
* reparametrised (the paper's training form, Hugging Face PEFT's ``prefix_projection``): an
  embedding ``E: [l, d]`` and a tanh MLP ``d -> hidden (512) -> n_layers * 2 * K * D`` produce all
  prefixes (layer-major, key before value, as PEFT's ``past_key_values`` layout). After training,
  :func:`fold` computes the prefixes once; the direct method (``config`` with
  ``reparametrize=False``, :func:`folded`) serves them, so only the prefixes are stored.

Initialisation follows Hugging Face PEFT: ``E`` (and the direct prefixes) ``N(0, 1)``; MLP
weights and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``. Trainable counts equal PEFT's:
direct ``n_layers * 2 * l * K * D``; reparametrised ``l d + d h + h + h (n_layers 2 K D) +
n_layers 2 K D``. Prefix tuning changes activations: it cannot be merged.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jpeft.core import checks
from jpeft.core import gates as gates_lib
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sharding as sharding_lib
from jpeft.core import sites as sites_lib

#: Hook points an attention needs for prefix tuning.
NEEDS = ("query", "keys", "lse", "context")
GATE_NAME, GATE_BIAS_NAME = "prefix_gate", "prefix_gate_bias"


class Attention(NamedTuple):
    """One attention the prefix reaches: scope, layer-stack lengths, heads ``N``, key/value heads
    ``K``, head size ``D``."""
    scope: tuple
    scanned: tuple
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def layers(self) -> int:
        return math.prod(self.scanned) if self.scanned else 1


def attentions(sites: sites_lib.Sites | None, targets: paths_lib.Targets = None, *,
               exclude: paths_lib.Targets = (), what: str = "prefix") -> list[Attention]:
    """The attentions (scopes with a ``context`` hook point) ``targets`` selects, in forward order.

    Raises:
      ValueError: none selected (listing the hook points the model has), or a selected attention
        without the ``query``/``keys``/``lse`` hook points.
    """
    ctxs = sites_lib.select_marks(sites, targets, "context", what=what, exclude=exclude)
    out = []
    for m in ctxs:
        missing = [k for k in NEEDS if (m.scope, k) not in sites.marks]
        if missing:
            raise ValueError(f"{what}: the attention at {paths_lib.path_str(m.scope)} lacks the "
                             f"hook points {missing} (prefix tuning needs {list(NEEDS)})")
        q = sites.marks[(m.scope, "query")].shape
        k = sites.marks[(m.scope, "keys")].shape
        if q is None or k is None:
            raise ValueError(f"{what}: {paths_lib.path_str(m.scope)} is reached with different "
                             f"shapes; probe the model with one forward pass")
        out.append(Attention(m.scope, m.scanned, q[-2], k[-2], k[-1]))
    return out


def prefix_attention(q: jax.Array, lse: jax.Array, ctx: jax.Array, pk: jax.Array,
                     pv: jax.Array, scale: float | None = None) -> jax.Array:
    """Attention output with a prefix, from the model's own log-normaliser and output.

    Args:
      q: queries ``[B, T, N, D]``; lse: ``logsumexp`` of the model's masked scores over its keys
        ``[B, T, N]``; ctx: the model's output ``softmax(scores) v``: ``[B, T, N, D]``; pk, pv:
        prefix ``[l, K, D]``, or ``[B, l, K, D]`` per example (gated);
      scale: the scores' scale ``c`` (default ``1/sqrt(D)``).

    Returns ``lam * ctx + (1 - lam) * softmax(c q pk^T) pv`` (module docstring), ``[B, T, N, D]``.
    """
    b, t, n, d = q.shape
    pk, pv = (x if x.ndim == 4 else x[None] for x in (pk, pv))               # [B or 1, l, K, D]
    k = pk.shape[2]
    c = d ** -0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, k, n // k, d)
    p = jnp.einsum("btkgd,blkd->btkgl", qg, pk.astype(jnp.float32)) * c     # [B, T, K, G, l]
    lse_p = jax.nn.logsumexp(p, axis=-1)                                       # [B, T, K, G]
    cp = jnp.einsum("btkgl,blkd->btkgd", jax.nn.softmax(p, axis=-1), pv.astype(jnp.float32))
    lse_s = lse.astype(jnp.float32).reshape(b, t, k, n // k)
    lam = jax.nn.sigmoid(lse_s - lse_p)[..., None]
    out = lam * ctx.astype(jnp.float32).reshape(b, t, k, n // k, d) + (1.0 - lam) * cp
    return out.reshape(b, t, n, d).astype(ctx.dtype)


def _uniform(key, shape, fan_in, dtype):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def prefix_tuning(num_virtual_tokens: int = 20, targets: paths_lib.Targets = None, *,
                  reparametrize: bool = False, shift_positions: bool = True,
                  gate: bool = False, hidden_size: int = 512,
                  token_dim: int | None = None, exclude: paths_lib.Targets = (),
                  scale: float | None = None, dtype: Any = jnp.float32,
                  name: str = "prefix") -> method_lib.Method:
    """Prefix tuning with ``l = num_virtual_tokens`` on every attention ``targets`` selects
    (``None``: all with the hook points).

    Args:
      reparametrize: train through the embedding + tanh MLP (see the module docstring; fold it
        away with :func:`fold`).
      shift_positions: the real tokens take positions ``l, l + 1, ...`` (the model's
        ``positions`` hook point plus ``l``), as in Li & Liang's and Hugging Face PEFT's prefix,
        which sits in the key/value cache ahead of the tokens; ``False`` keeps ``0, 1, ...``.
      gate: UniPELT's gated prefix: per example ``(g_k, g_v) = mean_tokens sigmoid(x W_g + b_g)``
        from the attention's input ``x`` (its ``"in"`` mark) scale ``P_k`` and ``P_v``
        (``prefix_gate [*L, d, 2] ~ N(0, 0.02^2)``, ``prefix_gate_bias [*L, 2] = 0`` at each
        attention's scope, as AdapterHub's gated prefix).
      hidden_size: the MLP's bottleneck (512, the paper's and PEFT's default).
      token_dim: the embedding width ``d`` (default: ``N * D`` of the first attention).
      scale: the attention's score scale (default ``1/sqrt(D)``, as jpeft's models).
    """
    checks.positive_int(name, "num_virtual_tokens", num_virtual_tokens)
    if reparametrize:
        checks.positive_int(name, "hidden_size", hidden_size)
    if scale is not None:
        checks.positive(name, "scale", scale)
    l = num_virtual_tokens

    def found(sites):
        atts = attentions(sites, targets, exclude=exclude, what=name)
        shapes = {(a.kv_heads, a.head_dim) for a in atts}
        if reparametrize and len(shapes) > 1:
            raise ValueError(f"{name}: one MLP produces every prefix, but the attentions have "
                             f"different key/value shapes {sorted(shapes)}")
        return atts

    def gates(key, atts, sites) -> dict:
        if not gate:
            return {}
        out = {}
        for a, k in zip(atts, jax.random.split(jax.random.fold_in(key, 7), len(atts))):
            d_in = sites.marks[(a.scope, "in")].shape[-1]
            out[a.scope + (GATE_NAME,)] = gates_lib.STD * jax.random.normal(
                k, a.scanned + (d_in, 2), dtype)
            out[a.scope + (GATE_BIAS_NAME,)] = jnp.zeros(a.scanned + (2,), dtype)
        return out

    def init(key, params, sites=None):
        del params
        atts = found(sites)
        extra = gates(key, atts, sites)
        if not reparametrize:
            keys = jax.random.split(key, len(atts))
            return paths_lib.unflatten({**{
                a.scope + (leaf,): jax.random.normal(kk, a.scanned + (l, a.kv_heads, a.head_dim),
                                                     dtype)
                for a, k in zip(atts, keys)
                for leaf, kk in zip(("prefix_keys", "prefix_values"), jax.random.split(k))},
                **extra})
        a0 = atts[0]
        d = token_dim or a0.heads * a0.head_dim
        n_out = sum(a.layers for a in atts) * 2 * a0.kv_heads * a0.head_dim
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        out = {"embedding": jax.random.normal(k1, (l, d), dtype),
               "mlp": {"w1": _uniform(k2, (d, hidden_size), d, dtype),
                       "b1": _uniform(k3, (hidden_size,), d, dtype),
                       "w2": _uniform(k4, (hidden_size, n_out), hidden_size, dtype),
                       "b2": _uniform(k5, (n_out,), hidden_size, dtype)}}
        if extra:
            out["gates"] = paths_lib.unflatten(extra)
        return out

    def edit(call, arrays):
        q = call.seen[(call.scope, "query")]
        s = call.seen[(call.scope, "lse")]
        pk, pv = arrays["keys"], arrays["values"]
        if gate:
            g = gates_lib.example_gates(call.seen[(call.scope, "in")], arrays["gate"], arrays["gate_bias"])
            pk = pk[None] * g[:, 0, None, None, None].astype(pk.dtype)
            pv = pv[None] * g[:, 1, None, None, None].astype(pv.dtype)
        return prefix_attention(q, s, call.value, pk, pv, scale)

    def shift(call, arrays):
        return call.value + l

    def edits(params, delta, sites, context):
        atts = found(sites)
        pre = prefixes(delta, atts, l, reparametrize)
        flat = paths_lib.flatten(delta["gates"] if reparametrize and gate else delta)
        gated = lambda a: ({"gate": flat[a.scope + (GATE_NAME,)],
                            "gate_bias": flat[a.scope + (GATE_BIAS_NAME,)]} if gate else {})
        marks = {(a.scope, "context"): sites_lib.MarkEdit(
            {"keys": pre[a.scope][0], "values": pre[a.scope][1], **gated(a)}, edit)
            for a in atts}
        if shift_positions:
            for m in sites_lib.select_marks(sites, None, "positions", what=f"{name} "
                                            f"(shift_positions=True; pass False for a model "
                                            f"without position ids)"):
                marks[m.key] = sites_lib.MarkEdit({}, shift)
        return sites_lib.Edits(params, {}, marks)


    config = {"method": "prefix", "num_virtual_tokens": l,
              "targets": list(targets) if isinstance(targets, tuple) else targets,
              "reparametrize": reparametrize, "shift_positions": shift_positions, "gate": gate,
              "hidden_size": hidden_size, "token_dim": token_dim,
              "exclude": list(exclude) if isinstance(exclude, tuple) else exclude,
              "scale": scale, "dtype": jnp.dtype(dtype).name, "name": name}
    return method_lib.Method(
        name=name, init=init, merge=None, unmerge=None, edits=edits,
        shardings=sharding_lib.replicated,
        labels=method_lib.constant_labels(name), config=config)


def prefixes(delta: Any, atts: list[Attention], num_virtual_tokens: int,
             reparametrize: bool) -> dict:
    """``{scope: (P_k, P_v)}``, each ``[*L, l, K, D]``, from a delta of either form."""
    if not reparametrize:
        flat = paths_lib.flatten(delta)
        return {a.scope: (flat[a.scope + ("prefix_keys",)], flat[a.scope + ("prefix_values",)])
                for a in atts}
    mlp, l, a0 = delta["mlp"], num_virtual_tokens, atts[0]
    h = jnp.tanh(delta["embedding"] @ mlp["w1"] + mlp["b1"]) @ mlp["w2"] + mlp["b2"]
    h = h.reshape(l, -1, 2, a0.kv_heads, a0.head_dim)              # [l, layers, 2, K, D]
    out, start = {}, 0
    for a in atts:
        block = jnp.moveaxis(h[:, start:start + a.layers], 0, 1)   # [layers, l, 2, K, D]
        block = block.reshape(a.scanned + (l, 2, a0.kv_heads, a0.head_dim))
        out[a.scope] = (block[..., 0, :, :], block[..., 1, :, :])
        start += a.layers
    return out


def from_config(config: dict) -> method_lib.Method:
    """The prefix method a saved ``config`` describes."""
    c = dict(config)
    if c.pop("method", None) != "prefix":
        raise ValueError(f"prefix.from_config: not a prefix tuning config: {config!r}")
    t = lambda v: tuple(v) if isinstance(v, list) else v
    c["targets"], c["exclude"] = t(c.get("targets")), t(c.get("exclude", ()))
    return prefix_tuning(**c)


def folded(method: method_lib.Method) -> method_lib.Method:
    """The direct (served) form of a reparametrised prefix method: same targets and ``l``."""
    return from_config({**method.config, "reparametrize": False})


def fold(method: method_lib.Method, delta: Any, sites: sites_lib.Sites) -> Any:
    """The prefixes a reparametrised ``delta`` produces, as the delta of :func:`folded`:
    ``{scope: {"prefix_keys", "prefix_values"}}``. The MLP and embedding are gone."""
    c = method.config
    if c.get("method") != "prefix" or not c.get("reparametrize"):
        raise ValueError(f"fold: {method.name!r} is not a reparametrised prefix method; its delta "
                         f"is already the prefixes")
    t = lambda v: tuple(v) if isinstance(v, list) else v
    atts = attentions(sites, t(c["targets"]), exclude=t(c["exclude"]), what=c["name"])
    pre = prefixes(delta, atts, c["num_virtual_tokens"], True)
    gates = paths_lib.flatten(delta.get("gates", {}))         # a gated prefix keeps its gates
    return paths_lib.unflatten({**{
        a.scope + (leaf,): v for a in atts
        for leaf, v in zip(("prefix_keys", "prefix_values"), pre[a.scope])}, **gates})
