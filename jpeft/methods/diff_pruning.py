"""Diff pruning (Guo, Rush and Kim, 2021, arXiv 2012.07463): a sparse, gated difference vector.

For every selected base leaf ``W`` (any shape)::

    W' = W + z * w,       w: like W, zero at init (training starts exactly at the base model)
    z  = hard-concrete gate per entry with log-odds alpha (jpeft.ops.hard_concrete), stretch (l, r)

Training samples ``z`` (``u ~ U(0, 1)``, ``s = sigmoid(logit(u) + alpha)``, ``z = clip(s (r - l) + l,
0, 1)``) with the key of ``jpeft.wrap(...)(..., delta_rng=key)``; without a key (evaluation,
:meth:`Method.merge`) the gate is deterministic, ``z = clip(sigmoid(alpha) (r - l) + l, 0, 1)``. The
loss adds the expected L0 norm of the difference (:func:`l0_penalty`)::

    lambda * sum_entries sigmoid(alpha - log(-l / r))

**Structured** variant (``structured=True``, paper section 3.3): every selected tensor ``g`` (a
weight matrix, a bias, ...) also gets one group gate ``z_g`` with logit ``alpha_g``, and
``z = z_entry * z_g``; the expected L0 of the product is
``sum_g sigmoid(alpha_g - log(-l/r)) * sum_{i in g} sigmoid(alpha_i - log(-l/r))``.

After training, :func:`project` keeps the ``k`` entries of largest ``|z * w|`` (deterministic
gates; one global ranking over all selected tensors, exactly ``k = round(density * n)`` of the
``n`` selected entries) and returns them as a :class:`jpeft.core.sparse.SparseDelta`; the optional
re-fine-tune trains those values with the mask fixed (:func:`jpeft.core.sparse.sparse_finetune`,
initialised at the projected values), saved sparse by :func:`jpeft.save` (the indices are the
method's data, the values its delta).

Defaults follow the paper and its code (github.com/dguo98/DiffPruning): ``l = -1.5``, ``r = 1.5``,
``alpha_init = 5`` (every gate starts open: the deterministic gate is 1 and ``P(z != 0) =
sigmoid(5) = 0.993``), ``lambda = 1.25e-7``, target density 0.5%. The paper trains ``alpha`` with its
own optimizer (AdamW, learning rate 0.1) and ``w`` with the model's learning rate: :func:`labels`
tells the two apart for ``optax.multi_transform``.

The delta mirrors the base tree: at the path of each selected leaf it holds ``{"w": [like W],
"alpha": float32 [like W]}`` and, when structured, ``"alpha_group": float32 []``; it is twice the
size of the selected parameters (the price of learning the mask), the stored result is ``O(k)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jpeft.core import checks
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib
from jpeft.core import sparse as sparse_lib
from jpeft.ops import hard_concrete as hc

#: The paper's L0 weight lambda (Guo et al., 2021, "sparsity_pen" in their scripts).
LAMBDA = 1.25e-7
#: The paper code's initial gate logit ("alpha_init"): gates start open.
ALPHA_INIT = 5.0

W, ALPHA, ALPHA_GROUP = "w", "alpha", "alpha_group"
_FIELDS = (W, ALPHA, ALPHA_GROUP)


def _entries(delta: Any) -> dict[paths_lib.Path, dict[str, Any]]:
    """``{base_path: {"w": ..., "alpha": ..., ["alpha_group": ...]}}`` of a diff-pruning delta."""
    out: dict[paths_lib.Path, dict[str, Any]] = {}
    for path, x in paths_lib.flatten(delta).items():
        if path[-1] not in _FIELDS:
            raise ValueError(f"diff_pruning: not a diff-pruning delta: unexpected leaf "
                             f"{paths_lib.path_str(path)}")
        out.setdefault(path[:-1], {})[path[-1]] = x
    for path, e in out.items():
        if W not in e or ALPHA not in e:
            raise ValueError(f"diff_pruning: entry {paths_lib.path_str(path)} needs both 'w' and "
                             f"'alpha', has {sorted(e)}")
    return out


def gates(delta: Any, *, key: jax.Array | None = None, l: float = hc.LOWER,
          r: float = hc.UPPER) -> dict:
    """The gate ``z`` (entry gate times group gate, if any) at every path of the delta, nested
    dict like the base tree: sampled with ``key``, deterministic without."""
    out = {}
    for i, (path, e) in enumerate(sorted(_entries(delta).items())):
        if key is None:
            z = hc.deterministic(e[ALPHA], l, r)
            if ALPHA_GROUP in e:
                z = z * hc.deterministic(e[ALPHA_GROUP], l, r)
        else:
            k_entry, k_group = jax.random.split(jax.random.fold_in(key, i))
            z = hc.sample(k_entry, e[ALPHA], l, r)
            if ALPHA_GROUP in e:
                z = z * hc.sample(k_group, e[ALPHA_GROUP], l, r)
        out[path] = z
    return paths_lib.unflatten(out)


def differences(delta: Any, *, key: jax.Array | None = None, l: float = hc.LOWER,
                r: float = hc.UPPER) -> dict:
    """The dense difference ``z * w`` at every path (deterministic gates unless ``key``)."""
    z = paths_lib.flatten(gates(delta, key=key, l=l, r=r))
    return paths_lib.unflatten({p: (z[p] * e[W].astype(z[p].dtype)).astype(e[W].dtype)
                                for p, e in _entries(delta).items()})


_differences_jit = jax.jit(differences, static_argnames=("l", "r"))


def expected_l0(delta: Any, *, l: float = hc.LOWER, r: float = hc.UPPER) -> jax.Array:
    """Expected number of non-zero entries of ``z * w`` (float32 scalar)::

        sum_entries sigmoid(alpha_i - log(-l/r))                                  (unstructured)
        sum_g sigmoid(alpha_g - log(-l/r)) * sum_{i in g} sigmoid(alpha_i - log(-l/r)) (structured)
    """
    total = jnp.zeros((), jnp.float32)
    for e in _entries(delta).values():
        part = hc.expected_l0(e[ALPHA], l, r)
        if ALPHA_GROUP in e:
            part = part * hc.prob_nonzero(e[ALPHA_GROUP], l, r).astype(jnp.float32)
        total = total + part
    return total


def l0_penalty(delta: Any, lam: float = LAMBDA, *, l: float = hc.LOWER,
               r: float = hc.UPPER) -> jax.Array:
    """``lam * expected_l0(delta)``: the term the loss adds (``penalty=`` of the recipes)."""
    return lam * expected_l0(delta, l=l, r=r)


def labels(delta: Any, *, weights: str = W, gate_logits: str = ALPHA) -> Any:
    """A label per leaf of a diff-pruning delta: ``weights`` for ``w``, ``gate_logits`` for the
    logits ``alpha`` and ``alpha_group``; for ``optax.multi_transform`` (the paper trains the gate
    logits with their own, much larger learning rate)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: weights if paths_lib.to_path(kp)[-1] == W else gate_logits, delta)


def project(delta: Any, density: float | None = None, *, k: int | None = None,
            l: float = hc.LOWER, r: float = hc.UPPER) -> sparse_lib.SparseDelta:
    """Magnitude projection: the ``k`` entries of largest ``|z * w|`` (deterministic gates), as a
    sparse delta whose values are those ``z * w``.

    Args:
      delta: a diff-pruning delta.
      density: fraction of the selected entries to keep, in ``(0, 1]``; ``k = round(density * n)``
        with ``n`` the number of entries of all selected tensors (the paper: 0.5% of the model).
      k: alternatively, the exact number of entries.

    Returns:
      ``SparseDelta(indices, values)``, exactly ``k`` entries (ties in magnitude, e.g. among zeros,
      go to the earlier position in tree order; see :func:`jpeft.core.sparse.top_k_indices`).
    """
    diff = _differences_jit(delta, l=l, r=r)
    scores = jax.tree_util.tree_map(jnp.abs, diff)
    indices = sparse_lib.top_k_indices(scores, k=k, density=density, what="diff_pruning.project")
    return sparse_lib.SparseDelta(indices, sparse_lib.gather(diff, indices))


def diff_pruning(targets: paths_lib.Targets = None, *, structured: bool = False,
                 l: float = hc.LOWER, r: float = hc.UPPER, alpha_init: float = ALPHA_INIT,
                 leaf_names: Sequence[str] | None = None,
                 layers_to_transform: int | Sequence[int] | None = None,
                 layers_pattern: str | None = None, exclude: paths_lib.Targets = (),
                 lam: float = LAMBDA, name: str = "diff_pruning") -> method_lib.Method:
    """Diff pruning on every floating leaf of the modules matched by ``targets`` (``None``: all).

    Args:
      targets, leaf_names, layers_to_transform, layers_pattern, exclude: the selection (see
        :mod:`jpeft.core.paths`); the paper prunes every parameter except the task head
        (``exclude=("classifier",)``, with the head trained by ``full_finetune``).
      structured: add one group gate per selected tensor (``z = z_entry * z_group``).
      l, r: stretch interval of the hard-concrete gates, ``l < 0 < 1 < r``.
      alpha_init: initial value of every gate logit.
      lam: weight of the expected-L0 penalty, ``method.penalty = lam * expected_l0``
        (:func:`l0_penalty`), which :func:`jpeft.make_train_step` adds to the loss when given the
        method; ``0`` drops it.

    The forward pass always materialises ``W + z * w`` (the gates of every entry change at every
    step, so there is no cheaper factored form).
    """
    checks.non_negative(name, "lam", lam)
    checks.finite(name, "alpha_init", alpha_init)
    if not (l < 0.0 and r > 1.0):
        raise ValueError(f"diff_pruning: the stretch interval needs l < 0 and r > 1, got l={l}, r={r}")
    sel = paths_lib.Selection(targets=targets, leaf_names=leaf_names,
                              layers_to_transform=layers_to_transform,
                              layers_pattern=layers_pattern, exclude=exclude)

    def init(key, params, sites=None):
        del key, sites
        flat = paths_lib.flatten(params)
        chosen = [p for p in paths_lib.select(params, sel, what=name)
                  if jnp.issubdtype(flat[p].dtype, jnp.floating)]
        if not chosen:
            raise ValueError(f"{name}: the selected leaves hold no floating-point parameters")
        out = {}
        for p in chosen:
            out[p + (W,)] = jnp.zeros(np.shape(flat[p]), flat[p].dtype)
            out[p + (ALPHA,)] = jnp.full(np.shape(flat[p]), alpha_init, jnp.float32)
            if structured:
                out[p + (ALPHA_GROUP,)] = jnp.full((), alpha_init, jnp.float32)
        return paths_lib.unflatten(out)

    def add(params, delta, key, sign):
        diff = paths_lib.flatten(differences(delta, key=key, l=l, r=r))
        return paths_lib.map_selected(
            lambda _, w, d: (w + sign * d.astype(w.dtype)).astype(w.dtype), params, diff)

    def edits(params, delta, sites, context):
        return sites_lib.Edits(add(params, delta, context.rng, 1.0))

    def shardings(param_shardings, delta, sites=None):
        flat_s = paths_lib.flatten(param_shardings)

        def one(kp, _):
            path = paths_lib.to_path(kp)
            base = flat_s[path[:-1]]
            if path[-1] == ALPHA_GROUP and isinstance(base, NamedSharding):
                return NamedSharding(base.mesh, PartitionSpec())
            return base
        return jax.tree_util.tree_map_with_path(one, delta)

    config = {"method": "diff_pruning", "targets": targets, "structured": structured, "l": l,
              "r": r, "alpha_init": alpha_init, "leaf_names": leaf_names,
              "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern,
              "exclude": exclude, "lam": lam, "name": name}
    return method_lib.Method(
        name=name, init=init,
        merge=lambda params, delta, sites=None: add(params, delta, None, 1.0),
        unmerge=lambda params, delta, sites=None: add(params, delta, None, -1.0),
        edits=edits, shardings=shardings, labels=method_lib.constant_labels(name),
        config=config,
        penalty=None if lam == 0 else (lambda delta: l0_penalty(delta, lam, l=l, r=r)))
