"""Additive deltas on a selected subset of the base weights: ``theta = theta_0 + delta``.

The building block of BitFit: the delta has one zero-initialised array per selected leaf, at that
leaf's path, with its shape, dtype and sharding. Merging adds it; unmerging subtracts it.
(:func:`jpeft.full_finetune` instead trains the selected leaves' values themselves.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib


def init_zeros(params: Any, selected: list[paths_lib.Path]) -> dict:
    """Nested dict with ``zeros_like`` of each selected leaf at its path."""
    flat = paths_lib.flatten(params)
    return paths_lib.unflatten({p: jnp.zeros_like(flat[p]) for p in selected})


def add(params: Any, delta: Any, sign: float = 1.0) -> Any:
    """``params + sign * delta`` at the delta's paths; other leaves are returned untouched."""
    flat = paths_lib.flatten(delta)
    return paths_lib.map_selected(
        lambda _, w, d: (w + sign * d.astype(w.dtype)).astype(w.dtype), params, flat)


def same_shardings(param_shardings: Any, delta: Any, sites: Any = None) -> Any:
    """Each delta leaf takes the sharding of the base leaf at the same path."""
    flat_s = paths_lib.flatten(param_shardings)
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: flat_s[paths_lib.to_path(kp)], delta)


def additive_method(name: str, selection: paths_lib.Selection, config: dict) -> method_lib.Method:
    """A :class:`~jpeft.core.method.Method` training ``selection`` additively."""
    def init(key, params, sites=None):
        del key, sites
        return init_zeros(params, paths_lib.select(params, selection, what=name))

    merge = lambda params, delta, sites=None: add(params, delta, 1.0)
    unmerge = lambda params, delta, sites=None: add(params, delta, -1.0)
    return method_lib.Method(
        name=name, init=init, merge=merge, unmerge=unmerge,
        edits=method_lib.merge_edits(merge), shardings=same_shardings,
        labels=method_lib.constant_labels(name), config=config)
