"""Bottleneck adapters: sequential (Houlsby, Pfeiffer), parallel, scaled parallel, multi-head parallel.

A bottleneck adapter is a small MLP added to a sublayer's output ``h`` (``[..., d_out]``)::

    a(x) = f(LN?(x) @ W_down + b_down) @ W_up + b_up        W_down [d_in, m], W_up [m, d_out]
    sequential (Houlsby et al., 2019):   h <- h + s * a(h)      (x = h, the sublayer output)
    parallel   (He et al., 2022):        h <- h + s * a(x)      (x = the sublayer's input)

``W_up = b_up = 0`` at ``init``, so the adapted model starts as the base model exactly; ``W_down``
is drawn ``N(0, 0.02^2)`` (AdapterHub's "bert" initialisation), ``b_down = 0``. ``m`` is the
bottleneck size, ``d // reduction_factor`` by default (16, METHODS.md). ``f`` is ReLU, GELU, SiLU
(swish) or tanh. ``s`` is 1 (Houlsby, Pfeiffer, parallel), 4 (scaled parallel) or learned (a
trainable scalar per adapter, 1 at init). ``ln_before`` puts a LayerNorm (scale 1, bias 0, trained)
on the adapter's input, AdapterHub's ``ln_before`` option.

Placements (where an adapter goes) are :class:`Placement` s over the model's marks
(:mod:`jpeft.core.marks`): the output mark ``(scope, "out")`` of each sublayer that ``out``
matches, and for a parallel adapter the input mark ``(scope', "in")`` that ``inp`` matches, paired
with each output by the longest common scope prefix (the same layer). The defaults follow Hugging
Face naming (jpeft's BERT and LLaMA, and linen/NNX models named like them):

* Houlsby: after the attention output projection and after the FFN output projection
  (:data:`ATTENTION_OUT`, :data:`FFN_OUT`), before the residual sum;
* Pfeiffer: after the FFN output projection only;
* parallel: the FFN, from the FFN's input (:data:`FFN_IN`) to its output projection; pass
  ``placements=(ATTENTION_PARALLEL, FFN_PARALLEL)`` for both sublayers;
* multi-head parallel: on each attention head's output (the ``context`` hook point
  ``[B, T, N, D_h]``): head ``n`` gets ``s * f(x @ W_down[n]) @ W_up[n]`` from the attention input
  ``x``, with ``W_down: [N, d, m / N]``, ``W_up: [N, m / N, D_h]`` (the bottleneck split across
  heads, so the budget equals a parallel adapter of size ``m``).

Any other model: name its sublayers' scopes (``jpeft.probe(...).marks`` lists them).

Layer-stacked models (``nn.scan`` / ``nnx.scan``) get one adapter per layer: every array has the
leading ``[L]`` axes of the scans around its mark, sliced per iteration by the backend.

The delta holds, for each adapted output mark ``(scope, "out")``, ``{"down", "down_bias", "up",
"up_bias"}`` (plus ``"ln_scale"``, ``"ln_bias"``, ``"scale"``) at path ``scope + ("out",)``.
Trainable count per adapter: ``d_in m + m + m d_out + d_out`` (+ ``2 d_in`` with ``ln_before``,
+ 1 for a learned scale). Adapters change activations: they cannot be merged
(``mode="materialised"`` raises).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import checks
from jpeft.core import contraction
from jpeft.core import gates as gates_lib
from jpeft.core import marks as marks_lib
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import precision
from jpeft.core import sharding as sharding_lib
from jpeft.core import sites as sites_lib

#: Attention output projection (Hugging Face naming: BERT ``attention/output/dense``, LLaMA
#: ``self_attn/o_proj``).
ATTENTION_OUT = r".*(attention/output/dense|self_attn/o_proj)"
#: FFN output projection (BERT ``layer/<i>/output/dense``, LLaMA ``mlp/down_proj``).
FFN_OUT = r".*(layer/[0-9]+/output/dense|mlp/down_proj)"
#: Attention sublayer input (BERT ``layer/<i>/attention``, LLaMA ``self_attn``).
ATTENTION_IN = r".*(layer/[0-9]+/attention|self_attn)"
#: FFN sublayer input (BERT ``intermediate``, LLaMA ``mlp``).
FFN_IN = r".*(intermediate|mlp)"
#: Attention module whose ``context`` hook point the multi-head parallel adapter edits.
ATTENTION_CONTEXT = r".*(attention/self|self_attn)"

ACTIVATIONS = {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "silu": jax.nn.silu,
               "swish": jax.nn.silu, "tanh": jnp.tanh}
INIT_STD = 0.02


class Placement(NamedTuple):
    """Where adapters go: the ``out_kind`` marks of the scopes ``out`` matches; for a parallel
    adapter also the ``in_kind`` marks of the scopes ``inp`` matches (``None``: sequential, the
    adapter reads the value it changes). Targets are module-path targets (a regex string or a list
    of path suffixes)."""
    out: paths_lib.Targets
    inp: paths_lib.Targets = None
    out_kind: str = "out"
    in_kind: str = "in"

    def to_json(self) -> dict:
        return {"out": _targets_json(self.out), "inp": _targets_json(self.inp),
                "out_kind": self.out_kind, "in_kind": self.in_kind}

    @classmethod
    def from_json(cls, d: dict) -> "Placement":
        t = lambda v: tuple(v) if isinstance(v, list) else v
        return cls(t(d["out"]), t(d.get("inp")), d.get("out_kind", "out"),
                   d.get("in_kind", "in"))


def _targets_json(t):
    return list(t) if isinstance(t, (tuple, list)) else t


ATTENTION_SEQUENTIAL = Placement(ATTENTION_OUT)
FFN_SEQUENTIAL = Placement(FFN_OUT)
ATTENTION_PARALLEL = Placement(ATTENTION_OUT, ATTENTION_IN)
FFN_PARALLEL = Placement(FFN_OUT, FFN_IN)
HEADS_PARALLEL = Placement(ATTENTION_CONTEXT, ATTENTION_IN, out_kind="context")


class Site(NamedTuple):
    """One adapter: the mark it changes, the mark it reads (``None``: the same), the stacked
    ``[L, ...]`` lengths, input and output widths, and heads (multi-head parallel)."""
    out: tuple
    inp: tuple | None
    scanned: tuple
    d_in: int
    d_out: int
    heads: int = 0


def _common(a: tuple, b: tuple) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def resolve(sites: sites_lib.Sites | None, placements: Sequence[Placement], *,
            layers_to_transform: int | Sequence[int] | None = None,
            layers_pattern: str | None = None, what: str = "adapter") -> list[Site]:
    """The adapters ``placements`` put on the model of ``sites``, in forward order.

    Raises:
      ValueError: a placement matching no mark (listing those that exist), an output with no
        input mark before it in the same layer, or a mark with an unknown shape.
    """
    layers = (layers_to_transform,) if isinstance(layers_to_transform, int) else layers_to_transform
    order = {k: i for i, k in enumerate(sites.marks)} if sites is not None else {}
    found: list[Site] = []
    for pl in placements:
        outs = sites_lib.select_marks(sites, pl.out, pl.out_kind, what=what)
        ins = (sites_lib.select_marks(sites, pl.inp, pl.in_kind, what=what)
               if pl.inp is not None else None)
        for m in outs:
            if m.shape is None:
                raise ValueError(f"{what}: {marks_lib.key_str(m.key)} is reached with different "
                                 f"shapes; one adapter cannot fit it")
            if layers is not None:
                if m.scanned:
                    raise ValueError(f"{what}: layers_to_transform selects layers by the index in "
                                     f"a module path; {marks_lib.key_str(m.key)} is inside a "
                                     f"layer scan (one adapter per layer, stacked)")
                if paths_lib.layer_index(m.scope, layers_pattern) not in layers:
                    continue
            src = None
            if ins is not None:
                before = [i for i in ins if order[i.key] < order[m.key] and i.scanned == m.scanned]
                if not before:
                    raise ValueError(f"{what}: no {pl.in_kind!r} mark matching {pl.inp!r} comes "
                                     f"before {marks_lib.key_str(m.key)} in the same layer stack")
                src = max(before, key=lambda i: (_common(i.scope, m.scope), order[i.key]))
            d_in = (src or m).shape[-1]
            if pl.out_kind == "context":       # [..., N, D_h]
                found.append(Site(m.key, src.key if src else None, m.scanned, d_in,
                                  m.shape[-1], m.shape[-2]))
            else:
                found.append(Site(m.key, src.key if src else None, m.scanned, d_in,
                                  m.shape[-1]))
    keys = [s.out for s in found]
    dup = sorted({marks_lib.key_str(k) for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"{what}: placements overlap at {dup}")
    return found


def _layer_norm(x, scale, bias, eps=1e-5):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def bottleneck(placements: Sequence[Placement] = (FFN_SEQUENTIAL,), *,
               reduction_factor: int = 16, bottleneck_size: int | None = None,
               activation: str = "relu", scaling: float | str = 1.0, ln_before: bool = False,
               gate: bool = False, phm_dim: int | None = None, phm_rank: int = 1,
               layers_to_transform: int | Sequence[int] | None = None,
               layers_pattern: str | None = None, dtype: Any = None,
               name: str = "adapter") -> method_lib.Method:
    """Bottleneck adapters at ``placements`` (see the module docstring for the math).

    Args:
      placements: where (:class:`Placement`; e.g. ``(ATTENTION_SEQUENTIAL, FFN_SEQUENTIAL)`` is
        Houlsby's).
      reduction_factor: ``m = d_out // reduction_factor`` (ignored when ``bottleneck_size`` is
        given); for the multi-head form ``m`` is split across the heads.
      bottleneck_size: ``m`` itself.
      activation: ``"relu"``, ``"gelu"``, ``"silu"`` (= ``"swish"``) or ``"tanh"``.
      scaling: ``s``, a number or ``"learned"`` (a trainable scalar per adapter, 1 at init).
      ln_before: a trained LayerNorm on the adapter input.
      phm_dim: Compacter's parametrisation (:func:`phm_weight`) with ``n = phm_dim`` shared rule
        matrices and rank-``phm_rank`` factors (``None``: plain dense projections).
      gate: UniPELT's gated adapter: the adapter's output times ``G = mean_tokens sigmoid(x W_g +
        b_g)`` per example, from the adapter's input ``x`` (AdapterHub's gating; ``gate [*L, d_in,
        1] ~ N(0, 0.02^2)``, ``gate_bias [*L, 1] = 0``).
      layers_to_transform, layers_pattern: only adapters of these layers (unrolled models; by
        the layer index in the scope path).
      dtype: dtype of the adapter arrays (default: the marked value's, float32 where that is of
        lower precision: :func:`jpeft.core.precision.delta_dtype`); the adapter computes in it.
      name: the method's name and optimizer label.

    Raises:
      ValueError: (here) a bad hyper-parameter; (at ``init``) placements that match no mark,
        ``m`` < 1, or a multi-head bottleneck not divisible by the number of heads.
    """
    if phm_dim is not None and (not isinstance(phm_dim, int) or phm_dim < 1 or phm_rank < 1):
        raise ValueError(f"{name}: phm_dim and phm_rank must be positive ints, got {phm_dim!r}, "
                         f"{phm_rank!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {sorted(ACTIVATIONS)}, got "
                         f"{activation!r}")
    if scaling != "learned":
        checks.positive(name, "scaling (a number or 'learned')", scaling)
    if bottleneck_size is None:
        checks.positive_int(name, "reduction_factor", reduction_factor)
    else:
        checks.positive_int(name, "bottleneck_size", bottleneck_size)
    placements = tuple(placements)
    if not placements:
        raise ValueError(f"{name}: no placements")
    act = ACTIVATIONS[activation]

    def sites_of(sites):
        return resolve(sites, placements, layers_to_transform=layers_to_transform,
                       layers_pattern=layers_pattern, what=name)

    def width(site: Site) -> int:
        m = bottleneck_size if bottleneck_size is not None else site.d_out // reduction_factor
        if site.heads:
            m = bottleneck_size if bottleneck_size is not None else (
                site.d_out * site.heads) // reduction_factor
            if m % site.heads:
                raise ValueError(f"{name}: bottleneck {m} at {marks_lib.key_str(site.out)} is not "
                                 f"divisible by its {site.heads} heads")
            m //= site.heads
        if m < 1:
            raise ValueError(f"{name}: bottleneck size {m} < 1 at {marks_lib.key_str(site.out)} "
                             f"(d = {site.d_out}, reduction factor {reduction_factor})")
        return m

    def init(key, params, sites=None):
        del params
        found = sites_of(sites)
        out = {}
        for k, site in zip(jax.random.split(key, len(found)), found):
            dt = precision.delta_dtype(sites.marks[site.out].dtype, dtype)
            m, lead = width(site), tuple(site.scanned)
            heads = (site.heads,) if site.heads else ()
            if phm_dim is None:
                arrays = {
                    "down": INIT_STD * jax.random.normal(k, lead + heads + (site.d_in, m), dt),
                    "up": jnp.zeros(lead + heads + (m, site.d_out), dt)}
            else:
                arrays = _phm_init(k, lead, site, m, phm_dim, phm_rank, dt, name)
            arrays.update(down_bias=jnp.zeros(lead + heads + (m,), dt),
                          up_bias=jnp.zeros(lead + heads + (site.d_out,), dt))
            if ln_before:
                arrays["ln_scale"] = jnp.ones(lead + (site.d_in,), dt)
                arrays["ln_bias"] = jnp.zeros(lead + (site.d_in,), dt)
            if scaling == "learned":
                arrays["scale"] = jnp.ones(lead, dt)
            if gate:
                arrays["gate"] = gates_lib.STD * jax.random.normal(jax.random.fold_in(k, 1),
                                                              lead + (site.d_in, 1), dt)
                arrays["gate_bias"] = jnp.zeros(lead + (1,), dt)
            out[site.out[0] + (site.out[1],)] = arrays
        tree = paths_lib.unflatten({p + (n,): a for p, arrs in out.items()
                                    for n, a in arrs.items()})
        if phm_dim is not None:        # the rule matrices A_i, shared by every PHM projection
            dt = precision.delta_dtype(sites.marks[found[0].out].dtype, dtype)
            tree[PHM_RULE] = jax.random.normal(jax.random.fold_in(key, 2),
                                               (phm_dim, phm_dim, phm_dim), dt) / phm_dim
        return tree

    def edit_fn(site: Site):
        def fn(call, a):
            if phm_dim is not None:
                a = dict(a, down=phm_weight(a["rule"], a["down_s"], a["down_t"]),
                         up=phm_weight(a["rule"], a["up_s"], a["up_t"]))
            x = call.value if site.inp is None else call.seen[site.inp]
            if ln_before:
                x = _layer_norm(x, a["ln_scale"], a["ln_bias"])
            x = x.astype(a["down"].dtype)
            if site.heads:        # x [..., d] -> per head [..., N, D_h]
                down = jnp.moveaxis(a["down"], 1, 0)                            # [d, N, m]
                h = act(contraction.dense(x, down) + a["down_bias"])            # [..., N, m]
                lead = h.shape[:-2]
                y = contraction.matmul(h.reshape(-1, *h.shape[-2:]), "tnm", a["up"], "nmo",
                                       "tno").reshape(*lead, *a["up"].shape[::2])
                y = y + a["up_bias"]
            else:
                y = contraction.dense(act(contraction.dense(x, a["down"]) + a["down_bias"]),
                                      a["up"]) + a["up_bias"]
            s = a["scale"] if scaling == "learned" else scaling
            if gate:
                g = gates_lib.example_gates(x, a["gate"], a["gate_bias"])[:, 0]          # [B]
                y = y * g.reshape((-1,) + (1,) * (y.ndim - 1)).astype(y.dtype)
            return call.value + (s * y).astype(call.value.dtype)
        return fn

    def edits(params, delta, sites, context):
        flat = paths_lib.flatten(delta)
        groups: dict = {}
        for path, v in flat.items():
            groups.setdefault(path[:-1], {})[path[-1]] = v
        out = {}
        for site in sites_of(sites):
            arrays = groups.get(site.out[0] + (site.out[1],))
            if arrays is None:
                raise ValueError(f"{name}: the delta has no adapter for "
                                 f"{marks_lib.key_str(site.out)} (was it initialised for this "
                                 f"model?)")
            if phm_dim is not None:   # shared rule, one copy per stacked layer for the scan
                rule = delta[PHM_RULE]
                arrays = dict(arrays, rule=jnp.broadcast_to(rule, tuple(site.scanned) + rule.shape))
            out[site.out] = sites_lib.MarkEdit(arrays, edit_fn(site))
        return sites_lib.Edits(params, {}, out)


    config = {"method": "bottleneck", "placements": [p.to_json() for p in placements],
              "reduction_factor": reduction_factor, "bottleneck_size": bottleneck_size,
              "activation": activation, "scaling": scaling, "ln_before": ln_before, "gate": gate,
              "phm_dim": phm_dim, "phm_rank": phm_rank,
              "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern,
              "dtype": None if dtype is None else np.dtype(dtype).name, "name": name}
    return method_lib.Method(
        name=name, init=init, merge=None, unmerge=None, edits=edits,
        shardings=sharding_lib.replicated,
        labels=method_lib.constant_labels(name), config=config)


PHM_RULE = "phm_rule"


def phm_weight(rule: jax.Array, s: jax.Array, t: jax.Array) -> jax.Array:
    """A parametrised hypercomplex multiplication (PHM) weight (Compacter):
    ``W = sum_i A_i kron (s_i t_i)``: ``rule A [n, n, n]``, ``s [n, p, r]``, ``t [n, r, q]`` ->
    ``W [n p, n q]``, ``W[a p' + i', b q' + j'] = sum_i A_i[a, b] (s_i t_i)[i', j']``."""
    n, p, q = rule.shape[0], s.shape[-2], t.shape[-1]
    w = jnp.einsum("iab,ipr,irq->apbq", rule, s, t)
    return w.reshape(n * p, n * q)


def _phm_init(key, lead, site: "Site", m: int, n: int, r: int, dt, name: str) -> dict:
    """Compacter's factors for one adapter: ``s`` Glorot-uniform, the up projection's ``t`` zero
    (so the adapter starts as the identity)."""
    if site.heads:
        raise ValueError(f"{name}: the PHM parametrisation is for whole-vector adapters, not the "
                         f"multi-head one")
    for what, d in (("input", site.d_in), ("bottleneck", m), ("output", site.d_out)):
        if d % n:
            raise ValueError(f"{name}: the {what} width {d} at {marks_lib.key_str(site.out)} is "
                             f"not divisible by phm_dim {n}")
    glorot = jax.nn.initializers.glorot_uniform(in_axis=-2, out_axis=-1,
                                                batch_axis=tuple(range(len(lead) + 1)))
    k1, k2, k3 = jax.random.split(key, 3)
    return {"down_s": glorot(k1, lead + (n, site.d_in // n, r), dt),
            "down_t": glorot(k2, lead + (n, r, m // n), dt),
            "up_s": glorot(k3, lead + (n, m // n, r), dt),
            "up_t": jnp.zeros(lead + (n, r, site.d_out // n), dt)}


def compacter(*, plus_plus: bool = True, reduction_factor: int = 32, phm_dim: int = 4,
              phm_rank: int = 1, activation: str = "gelu", **kw) -> method_lib.Method:
    """Compacter (Karimi Mahabadi et al., 2021): bottleneck adapters whose projections are PHM
    layers ``sum_i A_i kron (s_i t_i^T)`` (:func:`phm_weight`), the ``A_i`` shared by every
    adapter. ``plus_plus`` (Compacter++): one adapter after the FFN; otherwise Houlsby's two.
    Defaults: AdapterHub's (reduction factor 32, ``n = 4``, rank 1, GELU). Trainable count:
    ``n^3`` plus, per adapter, ``r (d_in + m) + r (m + d_out) + m + d_out`` (``n (p r + r q)`` per
    projection)."""
    placements = (FFN_SEQUENTIAL,) if plus_plus else (ATTENTION_SEQUENTIAL, FFN_SEQUENTIAL)
    return bottleneck(placements, reduction_factor=reduction_factor, activation=activation,
                      phm_dim=phm_dim, phm_rank=phm_rank, **kw)


def from_config(config: dict) -> method_lib.Method:
    """The adapter method a saved ``config`` describes (``bottleneck(...).config``)."""
    c = dict(config)
    if c.pop("method", None) != "bottleneck":
        raise ValueError(f"adapters.from_config: not a bottleneck adapter config: {config!r}")
    c["placements"] = tuple(Placement.from_json(p) for p in c["placements"])
    return bottleneck(**c)


def houlsby(*, reduction_factor: int = 16, activation: str = "relu", **kw) -> method_lib.Method:
    """Houlsby et al. (2019): sequential adapters after the attention output projection and after
    the FFN output projection."""
    return bottleneck((ATTENTION_SEQUENTIAL, FFN_SEQUENTIAL), reduction_factor=reduction_factor,
                      activation=activation, **kw)


def pfeiffer(*, reduction_factor: int = 16, activation: str = "relu", **kw) -> method_lib.Method:
    """Pfeiffer et al. (2021): one sequential adapter after the FFN output projection."""
    return bottleneck((FFN_SEQUENTIAL,), reduction_factor=reduction_factor,
                      activation=activation, **kw)


def parallel(placements: Sequence[Placement] = (FFN_PARALLEL,), *, scaling: float | str = 1.0,
             activation: str = "relu", **kw) -> method_lib.Method:
    """He et al. (2022): ``h <- sublayer(x) + s * f(x W_down) W_up`` from the sublayer input."""
    return bottleneck(placements, scaling=scaling, activation=activation, **kw)


def scaled_parallel(placements: Sequence[Placement] = (FFN_PARALLEL,), *,
                    scaling: float | str = 4.0, **kw) -> method_lib.Method:
    """The parallel adapter with ``s = 4`` (He et al.'s scaled PA), or ``scaling="learned"``."""
    return parallel(placements, scaling=scaling, **kw)


def multihead_parallel(*, scaling: float | str = 1.0, **kw) -> method_lib.Method:
    """A parallel adapter on each attention head's output (the ``context`` hook point)."""
    return parallel((HEADS_PARALLEL,), scaling=scaling, **kw)


def count(d_in: int, m: int, d_out: int, *, ln_before: bool = False,
          learned_scale: bool = False) -> int:
    """Trainable parameters of one adapter: ``d_in m + m + m d_out + d_out`` (+ ``2 d_in``, + 1)."""
    return d_in * m + m + m * d_out + d_out + (2 * d_in if ln_before else 0) + int(learned_scale)



def mam(*, prefix_length: int = 30, bottleneck_size: int = 512, scaling: float = 4.0,
        preset: str = "paper", **prefix_kw) -> method_lib.Method:
    """MAM adapter (He et al., 2022): prefix tuning on every attention plus a scaled parallel
    adapter on the FFN, composed as ``{"prefix": ..., "adapter": ...}``.

    ``preset="paper"``: prefix ``l = 30`` (direct) and a parallel FFN adapter with bottleneck 512,
    ``s = 4``, ReLU (the authors' repository: ``attn_bn = 30``, ``ffn_bn = 512``).
    ``preset="adapterhub"``: AdapterHub's ``MAMConfig``: the prefix trained through the
    reparametrisation MLP with bottleneck 800, and the parallel adapter with reduction factor 2
    (``bottleneck_size`` ignored), ``s = 4``, ReLU.
    """
    from jpeft.methods import prefix as prefix_lib
    if preset == "paper":
        pre = prefix_lib.prefix_tuning(prefix_length, **prefix_kw)
        ffn = scaled_parallel(bottleneck_size=bottleneck_size, scaling=scaling)
    elif preset == "adapterhub":
        pre = prefix_lib.prefix_tuning(prefix_length, reparametrize=True, hidden_size=800,
                                       **prefix_kw)
        ffn = scaled_parallel(reduction_factor=2, scaling=scaling)
    else:
        raise ValueError(f"mam: preset must be 'paper' or 'adapterhub', got {preset!r}")
    return method_lib.compose(prefix=pre, adapter=ffn)
