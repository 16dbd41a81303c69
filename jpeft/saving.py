"""A trained method saved with its delta and loaded back by name, as Hugging Face PEFT's
``save_pretrained`` / ``from_pretrained`` do.

``jpeft.save(path, method, delta)`` writes a :mod:`jpeft.checkpoint` (atomic, checksummed) whose
stored tree is ``{"delta": delta}`` plus ``{"data": method.data}`` for a method defined by data
(FAR's columns, sparse entries), with ``method.config`` in its metadata. ``jpeft.load(path,
params, sites)`` rebuilds the method from that config and data alone
(:func:`jpeft.methods.from_config`) and returns it with the delta, after checking that the delta
fits the method on ``params``: a checkpoint made for another base (other shapes, other module
names) is one :class:`jpeft.checkpoint.CheckpointError` naming the entries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from jpeft import checkpoint
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib

KIND = "jpeft-method"


class Loaded(NamedTuple):
    """What :func:`load` returns: the rebuilt ``method``, its ``delta``, and the checkpoint's
    ``step`` and user ``metadata``."""
    method: method_lib.Method
    delta: Any
    step: int | None
    metadata: dict


def save(directory: str | os.PathLike, method: method_lib.Method, delta: Any, *,
         step: int | None = None, metadata: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write ``delta`` with what rebuilds ``method`` (its config and data) to ``directory``.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is false.
      TypeError: a ``method.config`` that is not JSON-serialisable (the method could not be rebuilt).
      ValueError: a delta without arrays (nothing to save).
    """
    if not jax.tree_util.tree_leaves(delta):
        raise ValueError(f"save: the delta of {method.name!r} holds no arrays; there is nothing to "
                         f"save (did its targets select nothing?)")
    try:
        config = json.loads(json.dumps(method.config))
    except TypeError as e:
        raise TypeError(f"save: the config of method {method.name!r} is not JSON-serialisable "
                        f"({e}); it could not be rebuilt from the checkpoint") from None
    tree = {"delta": delta}
    if method.data is not None:
        tree["data"] = jax.tree_util.tree_map(np.asarray, method.data)
    meta = {"kind": KIND, "config": config, "user": dict(metadata or {})}
    return checkpoint.save(directory, tree, step=step, metadata=meta, overwrite=overwrite)


def _layout(tree: Any) -> dict[str, tuple]:
    return {paths_lib.path_str(p): (tuple(np.shape(x)), np.dtype(x.dtype))
            for p, x in paths_lib.flatten(tree).items()}


def read(directory: str | os.PathLike) -> Loaded:
    """The method saved at ``directory`` (by :func:`save`) rebuilt from its config and data, and
    its delta as stored (no base to check it against: :func:`load` checks).

    Raises:
      FileNotFoundError: no checkpoint at ``directory``.
      CheckpointError: not a :func:`save` checkpoint, or damaged files.
    """
    meta = checkpoint.metadata(directory)
    info = meta["metadata"]
    if not isinstance(info, dict) or info.get("kind") != KIND:
        raise checkpoint.CheckpointError(
            f"{directory} was not written by jpeft.save (no method config in its metadata); "
            f"restore it with jpeft.checkpoint.restore")
    stored = checkpoint.restore(directory, checkpoint.stored_like(directory))["delta"]
    data = stored.get("data")
    if data is not None:
        data = jax.tree_util.tree_map(np.asarray, data)
    from jpeft.methods import from_config
    return Loaded(from_config(info["config"], data), stored["delta"], meta["step"],
                  info.get("user", {}))


def load(directory: str | os.PathLike, params: Any, sites: Any = None) -> Loaded:
    """The method saved at ``directory`` (by :func:`save`), rebuilt, and its delta, checked
    against the base ``params``.

    Args:
      directory: a checkpoint written by :func:`save`.
      params: the base weights the delta is for (only their structure, shapes and dtypes are read).
      sites: the model's sites (:func:`jpeft.probe`) for methods that need them.

    Raises:
      FileNotFoundError: no checkpoint at ``directory``.
      CheckpointError: not a :func:`save` checkpoint, damaged files, or a delta that does not fit
        the rebuilt method on ``params`` (naming the entries).
    """
    loaded = read(directory)
    method, delta = loaded.method, loaded.delta
    want = _layout(jax.eval_shape(lambda k, p: method.init(k, p, sites), jax.random.key(0),
                                  params))
    got = _layout(delta)
    problems = [f"missing in checkpoint: {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"not expected by {method.name!r} on these params: {k}"
                 for k in sorted(got.keys() - want.keys())]
    problems += [f"{k}: checkpoint has {got[k][0]} {got[k][1]}, the method on these params "
                 f"{want[k][0]} {want[k][1]}" for k in sorted(got.keys() & want.keys())
                 if got[k][0] != want[k][0]]
    if problems:
        raise checkpoint.CheckpointError(
            f"the delta at {directory} does not fit method {method.name!r} on the given params "
            f"(another base model?):\n  " + "\n  ".join(problems[:20]))
    return loaded._replace(delta=_across_dtypes(delta, want, directory, method.name))


def _across_dtypes(delta: Any, want: dict, directory, name: str) -> Any:
    """``delta`` in the dtypes the rebuilt method makes on these params (its precision policy,
    :mod:`jpeft.core.precision`): a stored dtype that the wanted one holds exactly (bf16 or f16
    factors read as float32) is cast; a narrowing one is an error naming both dtypes."""
    lossy = []

    def one(kp, x):
        k = paths_lib.path_str(paths_lib.to_path(kp))
        target = want[k][1]
        if np.dtype(x.dtype) == target:
            return x
        if np.can_cast(np.dtype(x.dtype), target, "safe") or (
                np.dtype(x.dtype).name == "bfloat16" and target.itemsize >= 4
                and np.issubdtype(target, np.floating)):
            return np.asarray(x).astype(target)
        lossy.append(f"{k}: stored {np.dtype(x.dtype).name}, the method makes {target.name}")
        return x
    out = jax.tree_util.tree_map_with_path(one, delta)
    if lossy:
        raise checkpoint.CheckpointError(
            f"the delta at {directory} holds dtypes that method {name!r} would narrow "
            f"(its dtype setting or the precision policy on these params):\n  "
            + "\n  ".join(lossy[:20]) + "\nrebuild the method with dtype= the stored dtype "
            "(jpeft.methods.from_config({**config, 'dtype': ...})), or cast the delta yourself")
    return out
