"""LoRA (Hu et al., 2021, arXiv 2106.09685): a low-rank update of selected weights, of any rank.

For a weight ``W0: [in, out]`` (Flax layout, ``y = x @ W0 + b``)::

    W = W0 + s * A @ B,    A: [in, r],  B: [r, out],   s = alpha / r   (rsLoRA: alpha / sqrt(r))

and for any other weight the factors follow its contraction (:mod:`jpeft.core.sites`): with
input (contracted) axes ``I``, output axes ``O`` and stacked axes ``S`` (a ``scan``-stacked layer
axis, dot batch axes), ``A: [*S, *I, r]`` and ``B: [*S, r, *O]``; a DenseGeneral query kernel
``[in, heads, head_dim]`` gets ``A [in, r]``, ``B [r, heads, head_dim]``; a stacked ``[L, in, out]``
kernel ``A [L, in, r]``, ``B [L, r, out]``; a conv kernel ``[kh, kw, in, out]`` gets
``A [kh, kw, in, r]`` (a conv with ``r`` output channels) and ``B [r, out]`` (a 1x1 conv), as
Hugging Face PEFT's LoRA for ``Conv2d``.

``A`` is random (Kaiming-uniform with bound ``1/sqrt(fan_in)``, Hugging Face PEFT's default, or
Gaussian with std ``1/r``; ``fan_in = prod(I)``) and ``B = 0``, so training starts exactly at the
base model. The trainable count is ``sum r * (prod(I) + prod(O)) * prod(S)`` (73,728 for q, v at
r = 8 on a 6-layer, 384-wide BERT).

Two forward forms, chosen by :func:`jpeft.wrap`'s ``mode``:

* ``"factored"`` (default): ``y = op(x, W0) + s * op(dropout(x), A) . B`` at every contraction of
  an adapted weight (:func:`jpeft.core.contraction.low_rank`). ``W0`` only enters as a constant,
  so the backward pass never forms its gradient; it costs ``O(tokens * r * (|I| + |O|))`` extra
  FLOPs.
* ``"materialised"``: ``apply(W0 + s * A . B)``; the backward pass computes a full gradient for
  every adapted weight, and dropout cannot be applied (asking for it is an error).

Merging gives zero-overhead inference; unmerging restores ``W0`` up to float rounding.

The delta mirrors the base tree: at the path of each adapted weight it holds
``{"lora_A": A, "lora_B": B}``. Each factor axis takes the sharding of the weight axis it shares;
the rank axis is replicated.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import checks
from jpeft.core import compat
from jpeft.core import contraction
from jpeft.core import gates as gates_lib
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import precision
from jpeft.core import sharding as sharding_lib
from jpeft.core import sites as sites_lib

ALL_LINEAR = "all-linear"
A_NAME, B_NAME = "lora_A", "lora_B"
#: UniPELT's gate on LoRA: ``W_g`` laid out as ``A`` with rank 1, and its bias ``[*S, 1]``.
GATE_NAME, GATE_BIAS_NAME = "lora_gate", "lora_gate_bias"


def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _init_a(key, shape, dtype, init: str, rank: int, fan_in: int):
    if init == "kaiming":        # torch kaiming_uniform_(a=sqrt(5)) on [r, in]: bound 1/sqrt(in)
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return jax.random.normal(key, shape, dtype) / rank     # PEFT init_lora_weights="gaussian"


def example_gate(call: sites_lib.ContractionCall, w: sites_lib.Factor, b: sites_lib.Factor
                 ) -> jax.Array:
    """UniPELT's gate for one contraction call: ``G = mean_tokens sigmoid(x W_g + b_g)``, one value
    per example (the first of the input's free axes; the mean runs over its other free axes, e.g.
    the sequence), shaped to broadcast against ``call.y``. Values lie in ``[0, 1]``."""
    z = contraction.dot_with(call, call.x, w)                 # [*batch, *x_free, 1]
    z = jax.nn.sigmoid(z.astype(jnp.float32) + b.value.astype(jnp.float32))
    n_batch = z.ndim - 1 - (call.x.ndim - _n_contracted(call))
    n_xfree = z.ndim - 1 - n_batch
    g = z.mean(axis=tuple(range(n_batch + 1, n_batch + n_xfree)))[..., 0]    # [*batch, B]
    n_out = call.y.ndim - n_batch - n_xfree
    if call.weight_is_lhs:          # y: [*batch, *O, *x_free]
        shape = g.shape[:n_batch] + (1,) * n_out + g.shape[n_batch:] + (1,) * (n_xfree - 1)
    else:                           # y: [*batch, *x_free, *O]
        shape = g.shape + (1,) * (n_xfree - 1 + n_out)
    return g.reshape(shape)


def _n_contracted(call: sites_lib.ContractionCall) -> int:
    (lc, rc), (lb, rb) = compat.dot_dims(call.params)
    xc, xb = (rc, rb) if call.weight_is_lhs else (lc, lb)
    return len(xc) + len(xb)


def apply_dropout(key, x, rate: float):
    """Inverted dropout of ``x`` with keep probability ``1 - rate``."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def selection(targets, *, layers_to_transform=None, layers_pattern=None, exclude=()
              ) -> tuple[paths_lib.Selection, bool]:
    """The :class:`~jpeft.core.paths.Selection` of a LoRA-family method and whether it is
    ``"all-linear"``."""
    all_linear = targets == ALL_LINEAR
    return paths_lib.Selection(targets=None if all_linear else targets,
                               layers_to_transform=layers_to_transform,
                               layers_pattern=layers_pattern, exclude=exclude), all_linear


def select(params, sites, sel: paths_lib.Selection, all_linear: bool, what: str
           ) -> sites_lib.SiteSelection:
    """The adapted weights: every weight of a dot contraction for ``"all-linear"``; named targets
    may also be conv kernels."""
    kinds = ("dot", "ragged") if all_linear else ("dot", "ragged", "conv")
    return sites_lib.select(params, sites, sel, what=what, kinds=kinds, all_weights=all_linear)


def sliced_shape(shape, axes, layers) -> tuple[int, ...]:
    """A factor's shape when only ``layers = (weight axis, indices)`` of a stacked weight are
    adapted: the factor axis that shares that weight axis holds ``len(indices)`` slices."""
    if layers is None:
        return tuple(shape)
    axis, idx = layers
    return tuple(len(idx) if a == axis else d for d, a in zip(shape, axes))


def expand(f: sites_lib.Factor, layers, size: int) -> sites_lib.Factor:
    """The stored slices of ``f`` (``layers = (weight axis, indices)``) scattered into zeros of the
    stacked weight's ``size`` along that axis, so ``scan`` slices it like the weight; the gradient
    reaches only the stored slices."""
    if layers is None:
        return f
    axis, idx = layers
    pos = f.axes.index(axis)
    shape = list(f.value.shape)
    shape[pos] = size
    index = (slice(None),) * pos + (np.asarray(idx),)
    return sites_lib.Factor(jnp.zeros(shape, f.value.dtype).at[index].set(f.value), f.axes)


def stacked_layers(params, sites, sel, all_linear, what) -> dict:
    """``{path: ((weight axis, indices), layers in the stack)}`` for the stacked weights that
    ``layers_to_transform`` narrows (empty without it)."""
    if sel.layers_to_transform is None:
        return {}
    flat = paths_lib.flatten(params)
    return {p: (lay, int(flat[p].shape[lay[0]]))
            for p, lay in select(params, sites, sel, all_linear, what).layers.items()}


def factor_axes(sites, path, what: str) -> tuple[tuple, tuple]:
    return contraction.low_rank_axes(sites.layout(path, what=what))


def check_rank(rank: int, shape, layout, path, what: str, rank_name: str = "rank") -> None:
    """``rank <= min(prod(I), prod(O))``: a larger rank adds parameters and no expressiveness."""
    d_in = int(np.prod([shape[a] for a in layout.contract]))
    d_out = int(np.prod([shape[a] for a in layout.free]))
    if rank > min(d_in, d_out):
        raise ValueError(
            f"{what}: {rank_name} {rank} is larger than the weight {paths_lib.path_str(path)} of "
            f"shape {tuple(shape)} allows (at most min(in, out) = min({d_in}, {d_out}) = "
            f"{min(d_in, d_out)}; input axes {list(layout.contract)}, output axes "
            f"{list(layout.free)})")


def factor_shardings(param_shardings, delta, sites, what: str, names=(A_NAME, B_NAME),
                     layers_narrowed: bool = False, a_like=(GATE_NAME,)):
    """Each factor axis takes the mesh axes of the weight axis it shares (rank replicated); leaves
    not in ``names`` (e.g. AdaLoRA's ``lam``) keep only the weight's stacked axes. With
    ``layers_narrowed`` (``layers_to_transform`` on stacked weights) the scanned axes, which then
    hold only some layers, are replicated."""
    def axes_of(path, name):
        layout = sites.layout(path, what=what)
        a_axes, b_axes = contraction.low_rank_axes(layout)
        axes = {names[0]: a_axes, names[1]: b_axes, **{n: a_axes for n in a_like}}.get(
            name, tuple(layout.stack) + (None,))
        if layers_narrowed:
            axes = tuple(None if a in layout.scanned else a for a in axes)
        return axes
    return sharding_lib.follow_weight_axes(param_shardings, delta, axes_of)


def lora(targets: paths_lib.Targets | str = ("query", "value"), rank: int = 8, alpha: float = 8.0,
         *, use_rslora: bool = False, dropout: float = 0.0, init: str = "kaiming",
         gate: bool = False,
         layers_to_transform: int | Sequence[int] | None = None,
         layers_pattern: str | None = None,
         exclude: paths_lib.Targets = (), dtype=None,
         compute_dtype=None) -> method_lib.Method:
    """LoRA on the contraction weights matched by ``targets``.

    Args:
      targets: module or leaf paths (see :mod:`jpeft.core.paths`), or ``"all-linear"`` for the
        weight of every dot contraction, any rank (combine with ``exclude`` to leave out a task
        head, as Hugging Face PEFT does); :func:`report` lists what was adapted and skipped.
      rank: ``r``, at most ``min(prod(I), prod(O))`` of every adapted weight.
      alpha: scale numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
      dropout: dropout on the input of ``A`` (factored mode, when a ``delta_rng`` is given).
      init: ``"kaiming"`` (uniform, bound ``1/sqrt(fan_in)``) or ``"gaussian"`` (std ``1/r``) for
        ``A``.
      gate: UniPELT's gated LoRA: ``y = x W + G * s (x A) B`` with ``G = mean_tokens sigmoid(x
        W_g + b_g)`` per example (:func:`example_gate`; ``W_g`` laid out as ``A`` with rank 1,
        ``lora_gate`` and ``lora_gate_bias`` in the delta, ``W_g ~ N(0, 0.02^2)``, ``b_g = 0``).
        A gated LoRA cannot be merged.
      layers_to_transform, layers_pattern, exclude: narrow the selection.
      dtype: the factors' dtype; ``None``: float32 on a weight of lower precision (bf16, f16,
        integer codes), else the weight's dtype (:func:`jpeft.core.precision.delta_dtype`).
      compute_dtype: the dtype of the factored path's products (the input cast to it, the
        result cast back to the output's dtype); ``None``: the factors' dtype.

    ``init``, ``merge`` and the factored forward need the model's sites (:func:`jpeft.probe`).
    """
    checks.positive_int("lora", "rank", rank)
    checks.positive("lora", "alpha", alpha)
    checks.unit_interval("lora", "dropout", dropout)
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"lora: init must be 'kaiming' or 'gaussian', got {init!r}")
    s = scaling(rank, alpha, use_rslora)
    sel, all_linear = selection(targets, layers_to_transform=layers_to_transform,
                                layers_pattern=layers_pattern, exclude=exclude)

    def init_fn(key, params, sites=None):
        chosen = select(params, sites, sel, all_linear, "lora")
        flat = paths_lib.flatten(params)
        out = {}
        for i, path in enumerate(chosen.chosen):
            w = flat[path]
            layout = sites.layout(path, what="lora")
            check_rank(rank, w.shape, layout, path, "lora")
            a_shape, b_shape = contraction.low_rank_shapes(w.shape, layout, rank)
            a_axes, b_axes = contraction.low_rank_axes(layout)
            a_shape = sliced_shape(a_shape, a_axes, chosen.layers.get(path))
            b_shape = sliced_shape(b_shape, b_axes, chosen.layers.get(path))
            fan_in = int(np.prod([w.shape[a] for a in layout.contract]))
            dd = precision.delta_dtype(layout.dtype or w.dtype, dtype)
            a = _init_a(jax.random.fold_in(key, i), a_shape, dd, init, rank, fan_in)
            out[path] = {A_NAME: a, B_NAME: jnp.zeros(b_shape, dd)}
            if gate:
                g_shape = a_shape[:-1] + (1,)
                out[path][GATE_NAME] = gates_lib.STD * jax.random.normal(
                    jax.random.fold_in(key, 1_000_000 + i), g_shape, dd)
                out[path][GATE_BIAS_NAME] = jnp.zeros(
                    tuple(a_shape[j] for j, ax in enumerate(a_axes) if ax in layout.stack)
                    + (1,), dd)
        return paths_lib.unflatten(out)

    def factors(params, delta, sites) -> dict:
        """``{weight path: (Factor A, Factor B)}`` (stacked weights narrowed by
        ``layers_to_transform``: expanded to every layer, zeros elsewhere); gated:
        ``(A, B, gate, gate bias)``."""
        flat = paths_lib.flatten(delta)
        narrowed = stacked_layers(params, sites, sel, all_linear, "lora")
        out = {}
        for p in flat:
            if p[-1] == B_NAME:
                a_axes, b_axes = factor_axes(sites, p[:-1], "lora")
                lay, n = narrowed.get(p[:-1], (None, 0))
                out[p[:-1]] = (expand(sites_lib.Factor(flat[p[:-1] + (A_NAME,)], a_axes), lay, n),
                               expand(sites_lib.Factor(flat[p], b_axes), lay, n))
                if gate:
                    stack = tuple(a for a in a_axes if a is not None
                                  and a in sites.layout(p[:-1], what="lora").stack)
                    out[p[:-1]] += (
                        expand(sites_lib.Factor(flat[p[:-1] + (GATE_NAME,)], a_axes), lay, n),
                        expand(sites_lib.Factor(flat[p[:-1] + (GATE_BIAS_NAME,)], stack + (None,)),
                               lay, n))
        return out

    def add(params, delta, sites, sign):
        flat = paths_lib.flatten(params)
        upd = {p: (sign * s * contraction.outer(f[0], f[1], flat[p].shape))
               for p, f in factors(params, delta, sites).items()}
        return paths_lib.map_selected(lambda _, w, d: (w + d.astype(w.dtype)).astype(w.dtype),
                                      params, upd)

    merge = lambda params, delta, sites=None: add(params, delta, sites, 1.0)
    unmerge = lambda params, delta, sites=None: add(params, delta, sites, -1.0)

    def edit_fn(call, fs):
        x = call.x
        if call.rng is not None and dropout > 0.0:
            x = apply_dropout(call.rng, x, dropout)
        x = x.astype(precision.compute_dtype(fs[A_NAME].value, compute_dtype))
        u = s * contraction.low_rank(call, x, fs[A_NAME], fs[B_NAME])
        if gate:
            u = u * example_gate(call, fs[GATE_NAME], fs[GATE_BIAS_NAME]).astype(u.dtype)
        return call.y + u.astype(call.y.dtype)

    def weight_fn(w, fs, axes):
        """The edited weight ``W + s A B`` for a value ``w`` of the weight whose axes are
        ``axes``, where the factored edit cannot follow it."""
        return w + (s * contraction.outer(fs[A_NAME], fs[B_NAME], w.shape, axes)).astype(w.dtype)

    def edits(params, delta, sites, context):
        if context.mode == "materialised":
            if gate:
                raise ValueError("lora: a gated LoRA (gate=True) cannot be materialised: the gate "
                                 "depends on each example's input; use mode='factored'")
            if dropout > 0.0 and context.rng is not None:
                raise ValueError(
                    f"lora: dropout={dropout} cannot be applied in mode='materialised' "
                    f"(the update is folded into the weight, there is no separate input to drop); "
                    f"use mode='factored', or dropout=0, or pass delta_rng=None")
            return sites_lib.Edits(merge(params, delta, sites))
        names = (A_NAME, B_NAME, GATE_NAME, GATE_BIAS_NAME)
        return sites_lib.Edits(params, {
            path: sites_lib.ContractionEdit(dict(zip(names, f)), edit_fn,
                                            weight=None if gate else weight_fn, views=not gate)
            for path, f in factors(params, delta, sites).items()})

    config = {"method": "lora", "targets": targets, "rank": rank, "alpha": float(alpha),
              "use_rslora": use_rslora, "dropout": dropout, "init": init,
              "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern,
              "exclude": exclude, "scaling": s, "gate": gate,
              **precision.config(dtype, compute_dtype)}
    return method_lib.Method(
        name="lora", init=init_fn, merge=None if gate else merge,
        unmerge=None if gate else unmerge, edits=edits,
        shardings=lambda ps, d, sites=None: factor_shardings(
            ps, d, sites, "lora", layers_narrowed=layers_to_transform is not None),
        labels=method_lib.constant_labels("lora"), config=config)


def report(params, sites, targets: paths_lib.Targets | str = ALL_LINEAR, *,
           layers_to_transform=None, layers_pattern=None, exclude=()) -> sites_lib.SiteSelection:
    """Which weights ``lora(targets, ...)`` adapts on this model and which it skips, and why."""
    sel, all_linear = selection(targets, layers_to_transform=layers_to_transform,
                                layers_pattern=layers_pattern, exclude=exclude)
    return select(params, sites, sel, all_linear, "lora")
