"""IA3 (Liu et al., 2022, arXiv 2205.05638): learned vectors that rescale activations.

For each targeted linear module ``y = x W + b`` (any contraction layout: Dense, DenseGeneral,
nnx.Linear, a layer-stacked kernel under scan) one vector ``l``, ones at ``init``:

* an ordinary target rescales the module's output:   ``y <- l * (x W + b)``   (keys, values);
* a *feed-forward* target rescales its input:         ``y <- (l * x) W + b``  (the FFN's
  intermediate activation, entering the FFN's output projection).

``l`` has the shape of the kernel's output axes (or its contracted axes for a feed-forward
target), with the leading ``[L]`` axes of a layer-stacked kernel. Both forms are mergeable into the
weight they touch: ``W' = W diag(l)``, ``b' = l b`` and ``W' = diag(l) W``; :func:`ia3` merges
exactly and unmerges by dividing (``l`` must then have no zeros).

Defaults are Hugging Face PEFT's (``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`` and the
feed-forward mapping) for BERT (``key``, ``value``, ``output.dense``; feed-forward ``output.dense``:
as in PEFT's suffix matching this also takes the attention output dense as a feed-forward module)
and LLaMA (``k_proj``, ``v_proj``, ``down_proj``; feed-forward ``down_proj``), so the trainable
count equals PEFT's. The factored form applies ``l`` at the module's ``"out"`` / ``"in"`` mark
(:mod:`jpeft.core.marks`); the materialised form merges.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import precision
from jpeft.core import sharding as sharding_lib
from jpeft.core import sites as sites_lib

#: Hugging Face PEFT's IA3 targets for BERT and LLaMA: module paths ending in one of them (a
#: regex, so the modules of either architecture match; a list must match every entry).
TARGETS = r"(.*/)?(key|value|output/dense|k_proj|v_proj|down_proj)"
#: ... and the ones among them treated as feed-forward (input rescaled).
FEEDFORWARD = ("output/dense", "down_proj")
#: Name of the delta leaf under each kernel's path (Hugging Face PEFT's ``ia3_l``).
LEAF = "ia3_l"


class Target(NamedTuple):
    """One rescaled module: its kernel path, the bias path (``None``: no bias or an input-scaled
    module), whether the input is rescaled, the kernel axes ``l`` spans (stacked first), and the
    module's mark it rescales (``(scope, "in" | "out")``)."""
    kernel: tuple
    bias: tuple | None
    feedforward: bool
    axes: tuple[int, ...]
    mark: tuple


def resolve(params: Any, sites: sites_lib.Sites | None, targets: paths_lib.Targets,
            feedforward: paths_lib.Targets, exclude: paths_lib.Targets = (), *,
            what: str = "ia3") -> list[Target]:
    """The modules IA3 rescales, from the weights their contraction sites show.

    Raises:
      ValueError: no sites; nothing matched (the closest paths); a matched module whose kernel is
        not a plain ``dot`` weight (a conv, conflicting layouts, dot batch axes) or whose
        input/output is not marked (a module jpeft cannot see the call of).
    """
    sel = sites_lib.select(params, sites, paths_lib.Selection(targets=targets, exclude=exclude),
                           what=what)
    flat = paths_lib.flatten(params)
    out = []
    for path in sel.chosen:
        layout = sites.contractions[path]
        if layout.stack != layout.scanned:
            raise ValueError(f"{what}: {paths_lib.path_str(path)} is contracted with batch axes "
                             f"{layout.stack}; IA3 rescales plain linear maps")
        ff = paths_lib.matches(path[:-1], feedforward)
        axes = tuple(layout.scanned) + tuple(layout.contract if ff else layout.free)
        bias = path[:-1] + ("bias",)
        want = tuple(flat[path].shape[a] for a in tuple(layout.scanned) + tuple(layout.free))
        bias = bias if (not ff and bias in flat and tuple(flat[bias].shape) == want) else None
        kind = "in" if ff else "out"
        mark = sites_lib.module_mark(sites, path, kind)
        if mark is None:
            raise ValueError(f"{what}: the {'input' if ff else 'output'} of the module holding "
                             f"{paths_lib.path_str(path)} is not a marked site (a linen or NNX "
                             f"module call is marked automatically; raw code can mark it with "
                             f"jpeft.core.marks.mark(x, scope, {kind!r}))")
        out.append(Target(path, bias, ff, axes, mark))
    return out


def _scale_along(w: jax.Array, l: jax.Array, axes: tuple[int, ...], inverse: bool) -> jax.Array:
    """``w`` times ``l`` broadcast along ``axes`` of ``w`` (``l``'s axes in that order)."""
    order = np.argsort(axes)
    l = jnp.transpose(l, order) if l.ndim > 1 else l
    shape = [1] * w.ndim
    for a in sorted(axes):
        shape[a] = w.shape[a]
    l = l.reshape(shape).astype(w.dtype)
    return w / l if inverse else w * l


def ia3(targets: paths_lib.Targets = TARGETS, feedforward: paths_lib.Targets = FEEDFORWARD, *,
        exclude: paths_lib.Targets = (), name: str = "ia3", dtype=None) -> method_lib.Method:
    """IA3 on the modules ``targets`` selects (feed-forward ones, matched by ``feedforward``,
    rescale their input).

    The delta holds ``l`` at ``<kernel path>/ia3_l``, in ``dtype`` (default the kernel's, float32
    on a lower-precision one: :func:`jpeft.core.precision.delta_dtype`). Trainable count: the
    output width of each ordinary target plus the input width of each feed-forward one (per
    stacked layer).
    """

    def found(params, sites):
        return resolve(params, sites, targets, feedforward, exclude, what=name)

    def init(key, params, sites=None):
        del key
        flat = paths_lib.flatten(params)
        return paths_lib.unflatten({
            t.kernel + (LEAF,): jnp.ones(tuple(flat[t.kernel].shape[a] for a in t.axes),
                               precision.delta_dtype(flat[t.kernel].dtype, dtype))
            for t in found(params, sites)})

    def scale(params, delta, sites, inverse):
        flat_d = paths_lib.flatten(delta)
        upd = {}
        for t in found(params, sites):
            l = flat_d[t.kernel + (LEAF,)]
            upd[t.kernel] = (l, t.axes)
            if t.bias is not None:
                upd[t.bias] = (l, None)

        def one(path, w, u):
            l, axes = u
            if axes is None:                 # bias [*L, *O]: elementwise
                l = l.astype(w.dtype)
                return w / l if inverse else w * l
            return _scale_along(w, l, axes, inverse)
        return paths_lib.map_selected(one, params, upd)

    merge = lambda params, delta, sites=None: scale(params, delta, sites, False)
    unmerge = lambda params, delta, sites=None: scale(params, delta, sites, True)

    def edit(call, arrays):
        return call.value * arrays["l"].astype(call.value.dtype)

    def edits(params, delta, sites, context):
        if context.mode == "materialised":
            return sites_lib.Edits(merge(params, delta, sites))
        flat_d = paths_lib.flatten(delta)
        return sites_lib.Edits(params, {}, {
            t.mark: sites_lib.MarkEdit({"l": flat_d[t.kernel + (LEAF,)]}, edit)
            for t in found(params, sites)})

    def shardings(param_shardings, delta, sites=None):
        def axes_of(path, name):
            del name
            layout = sites.contractions[path] if sites is not None else None
            if layout is None:
                return None
            ff = paths_lib.matches(path[:-1], feedforward)
            return tuple(layout.scanned) + tuple(layout.contract if ff else layout.free)
        return sharding_lib.follow_weight_axes(param_shardings, delta, axes_of)

    config = {"method": "ia3", "targets": _json(targets), "feedforward": _json(feedforward),
              "exclude": _json(exclude), "name": name,
              "dtype": precision.config(dtype, None)["dtype"]}
    return method_lib.Method(
        name=name, init=init, merge=merge, unmerge=unmerge, edits=edits, shardings=shardings,
        labels=method_lib.constant_labels(name), config=config)


def _json(t):
    return list(t) if isinstance(t, tuple) else t


def from_config(config: dict) -> method_lib.Method:
    """The IA3 method a saved ``config`` describes."""
    c = dict(config)
    if c.pop("method", None) != "ia3":
        raise ValueError(f"ia3.from_config: not an IA3 config: {config!r}")
    t = lambda v: tuple(v) if isinstance(v, list) else v
    return ia3(t(c["targets"]), t(c["feedforward"]), exclude=t(c.get("exclude", ())),
               name=c.get("name", "ia3"), dtype=c.get("dtype"))

