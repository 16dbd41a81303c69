"""Splitting and combining parameter trees, and counting what is trainable.

A *frozen/trainable split* keeps the structure of the original tree and puts ``None`` where a leaf
belongs to the other half (``None`` is an empty subtree for ``jax.tree_util``, so both halves can be
passed through ``jax.jit``, ``jax.grad`` and optax as they are). :func:`combine` puts them back.
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple

import jax
import numpy as np

from jpeft.core import paths as paths_lib


def split(tree: Any, selected: Iterable[paths_lib.Path]) -> tuple[Any, Any]:
    """``(selected_part, rest)`` of ``tree``; each has ``None`` where the other has a leaf."""
    chosen = set(selected)
    keep = lambda kp, x: x if paths_lib.to_path(kp) in chosen else None
    drop = lambda kp, x: None if paths_lib.to_path(kp) in chosen else x
    return (jax.tree_util.tree_map_with_path(keep, tree),
            jax.tree_util.tree_map_with_path(drop, tree))


def combine(*trees: Any) -> Any:
    """Inverse of :func:`split`: for every position, the one leaf that is not ``None``."""
    def pick(*xs):
        present = [x for x in xs if x is not None]
        if len(present) > 1:
            raise ValueError("combine: a leaf is present in more than one tree")
        return present[0] if present else None
    return jax.tree_util.tree_map(pick, *trees, is_leaf=lambda x: x is None)


def num_params(tree: Any) -> int:
    """Total number of scalar entries in the array leaves of ``tree`` (a quantized weight counts
    the entries of the array it stands for; :func:`num_bytes` counts what it stores)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=paths_lib.is_array_node)
    return int(sum(int(np.prod(np.shape(x))) for x in leaves))


def num_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of ``tree`` (shape x itemsize; works on abstract arrays)."""
    return int(sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree)))


class ParamReport(NamedTuple):
    """Trainable versus total parameters.

    ``trainable`` counts the entries of the delta tree training can change (every entry, unless the
    method says otherwise: :func:`trainable_count`), ``base`` every entry of the frozen tree, and
    ``percent = 100 * trainable / base``: the fraction of the base model that is trained, as the PEFT
    papers report it.
    """
    trainable: int
    base: int
    percent: float

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || base params: {self.base:,} || "
                f"trainable%: {self.percent:.4f}")


def trainable_count(delta: Any, method: Any = None) -> int:
    """The entries of ``delta`` training can change: ``method.trainable(delta)`` where the method
    has entries held at zero (:attr:`jpeft.Method.trainable`), else every entry."""
    count = getattr(method, "trainable", None)
    return num_params(delta) if count is None else int(count(delta))


def param_report(params: Any, delta: Any, method: Any = None) -> ParamReport:
    """Counts for a base tree and the delta of ``method`` (every delta entry when ``None``)."""
    base, trainable = num_params(params), trainable_count(delta, method)
    return ParamReport(trainable, base, 100.0 * trainable / max(base, 1))
