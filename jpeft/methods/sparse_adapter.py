"""SparseAdapter (He et al., 2022, "SparseAdapter: An Easy Approach for Improving the
Parameter-Efficiency of Adapters"): a (larger) bottleneck adapter pruned at initialisation, its
mask kept fixed while training.

1. :func:`prune_masks` scores every entry of the adapters' projection weights (``down`` and
   ``up``; biases are kept) and keeps the top ``1 - sparsity`` of each weight (per matrix, per
   stacked layer):

   * ``"magnitude"``: ``|w|``;
   * ``"snip"`` (Lee et al., 2019): ``|w * dL/dw|`` on a batch, from :func:`snip_scores`;
   * ``"random"``: uniform scores (the paper's random-pruning baseline).

   Scores are taken on a *scoring* initialisation where ``W_up`` is drawn like ``W_down``
   (``N(0, 0.02^2)``, AdapterHub's "bert" initialisation): with jpeft's zero ``W_up`` every SNIP
   score would vanish. Training then starts from the usual zero ``W_up`` (the base model exactly).
2. :func:`sparse_adapter` is the adapter with ``w * mask`` in place of each pruned weight: masked
   entries never reach the output and get zero gradients, so they stay zero. The masks are part of
   the method's config (bit-packed), so the saved config rebuilds it exactly.

Trainable count (:func:`trainable_count`, the method's ``trainable``): the kept entries plus the
biases (and any LayerNorm, scale, gate of the adapter).
"""

from __future__ import annotations

import base64
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.methods import adapters as adapters_lib

#: The adapter leaves that are pruned (dense projections).
PRUNED = ("down", "up")
CRITERIA = ("magnitude", "snip", "random")


def scoring_init(method: method_lib.Method, key, params, sites) -> Any:
    """The adapter's initialisation with ``W_up`` drawn like ``W_down`` (for scoring only)."""
    delta = method.init(key, params, sites)

    def one(kp, x):
        name = paths_lib.to_path(kp)[-1]
        if name == "up":
            return adapters_lib.INIT_STD * jax.random.normal(
                jax.random.fold_in(key, zlib.crc32(paths_lib.path_str(paths_lib.to_path(kp))
                                                   .encode())),
                x.shape, x.dtype)
        return x
    return jax.tree_util.tree_map_with_path(one, delta)


def snip_scores(loss_fn: Callable[[Any], jax.Array], delta: Any) -> Any:
    """``|w * dL/dw|`` for every leaf of ``delta`` (``loss_fn(delta) -> scalar`` on a batch)."""
    grads = jax.grad(loss_fn)(delta)
    return jax.tree_util.tree_map(lambda w, g: jnp.abs(w * g), delta, grads)


def prune_masks(delta: Any, sparsity: float, *, criterion: str = "magnitude",
                scores: Any = None, key: jax.Array | None = None) -> dict:
    """``{path of a down/up weight: bool mask}`` keeping the top ``1 - sparsity`` of each weight
    (per stacked layer when the weight has leading ``[L]`` axes: the last two axes are the
    matrix).

    Args:
      delta: an adapter delta (:func:`scoring_init` for ``"magnitude"``/``"snip"``).
      scores: for ``"snip"``, :func:`snip_scores`; ignored otherwise.
      key: for ``"random"``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparse_adapter: sparsity must be in [0, 1), got {sparsity}")
    if criterion not in CRITERIA:
        raise ValueError(f"sparse_adapter: criterion must be one of {CRITERIA}, got {criterion!r}")
    if criterion == "snip" and scores is None:
        raise ValueError("sparse_adapter: criterion='snip' needs scores=snip_scores(loss, delta)")
    if criterion == "random" and key is None:
        raise ValueError("sparse_adapter: criterion='random' needs a key")
    flat = paths_lib.flatten(delta)
    flat_s = paths_lib.flatten(scores) if scores is not None else {}
    masks = {}
    for i, (path, w) in enumerate(sorted(flat.items())):
        if path[-1] not in PRUNED:
            continue
        if criterion == "magnitude":
            s = np.abs(np.asarray(w, np.float32))
        elif criterion == "snip":
            s = np.asarray(flat_s[path], np.float32)
        else:
            s = np.asarray(jax.random.uniform(jax.random.fold_in(key, i), np.shape(w)))
        mat = s.reshape(-1, s.shape[-2] * s.shape[-1])                # [layers, entries]
        keep = int(round((1.0 - sparsity) * mat.shape[1]))
        order = np.argsort(-mat, axis=1, kind="stable")[:, :keep]
        m = np.zeros(mat.shape, bool)
        np.put_along_axis(m, order, True, axis=1)
        masks[path] = m.reshape(s.shape)
    if not masks:
        raise ValueError("sparse_adapter: the delta has no adapter projection weights to prune")
    return masks


def _pack(masks: dict) -> dict:
    return {paths_lib.path_str(p): {"shape": list(m.shape),
                                    "bits": base64.b64encode(np.packbits(m.ravel())).decode()}
            for p, m in masks.items()}


def _unpack(packed: dict) -> dict:
    out = {}
    for p, d in packed.items():
        n = int(np.prod(d["shape"]))
        bits = np.unpackbits(np.frombuffer(base64.b64decode(d["bits"]), np.uint8))[:n]
        out[tuple(p.split("/"))] = bits.astype(bool).reshape(d["shape"])
    return out


def sparse_adapter(masks: dict, placements=(adapters_lib.FFN_SEQUENTIAL,), *,
                   name: str = "sparse_adapter", **adapter_kw) -> method_lib.Method:
    """The bottleneck adapter (``adapters.bottleneck(placements, **adapter_kw)``) with its
    projection weights multiplied by the fixed ``masks`` (:func:`prune_masks`)."""
    base = adapters_lib.bottleneck(placements, name=name, **adapter_kw)
    masks = {tuple(p): np.asarray(m, bool) for p, m in masks.items()}

    def masked(delta):
        def one(kp, x):
            m = masks.get(paths_lib.to_path(kp))
            return x if m is None else x * jnp.asarray(m, x.dtype)
        return jax.tree_util.tree_map_with_path(one, delta)

    def init(key, params, sites=None):
        delta = base.init(key, params, sites)
        flat = paths_lib.flatten(delta)
        for p, m in masks.items():
            if p not in flat or tuple(np.shape(flat[p])) != m.shape:
                raise ValueError(f"{name}: mask {paths_lib.path_str(p)} {m.shape} does not fit the "
                                 f"adapter (its weight: "
                                 f"{np.shape(flat[p]) if p in flat else 'missing'})")
        return masked(delta)

    config = {**base.config, "method": "sparse_adapter", "masks": _pack(masks)}
    return base._replace(
        init=init, edits=lambda params, delta, sites, context: base.edits(
            params, masked(delta), sites, context), config=config,
        trainable=lambda delta: trainable_count(delta, masks))


def trainable_count(delta: Any, masks: dict) -> int:
    """Kept entries of the pruned weights plus every other leaf's size."""
    flat = paths_lib.flatten(delta)
    return int(sum(int(masks[p].sum()) if p in masks else int(np.size(v))
                   for p, v in flat.items()))


def from_config(config: dict) -> method_lib.Method:
    """The SparseAdapter a saved ``config`` describes (masks included)."""
    c = dict(config)
    if c.pop("method", None) != "sparse_adapter":
        raise ValueError(f"sparse_adapter.from_config: not a SparseAdapter config: {config!r}")
    masks = _unpack(c.pop("masks"))
    c["placements"] = tuple(adapters_lib.Placement.from_json(p) for p in c["placements"])
    return sparse_adapter(masks, **c)
