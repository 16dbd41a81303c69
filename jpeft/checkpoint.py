"""Saving and restoring delta trees (and optimizer state) with orbax.

Only the delta is written, never the frozen base: a LoRA checkpoint of MiniLM is a few hundred KB.
Writes are atomic (orbax writes to a temporary directory and renames it when complete), so an
interrupted save never leaves a half-written checkpoint under the final name. Restoring checks
every shape and dtype against the tree you restore into and names each mismatch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jpeft.core import paths as paths_lib


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(directory: str | os.PathLike, delta: Any, *, opt_state: Any = None, step: int | None = None,
         metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``delta`` (and optionally ``opt_state`` and ``step``) to ``directory``.

    Layout: items ``delta`` and ``opt_state`` (orbax standard pytrees) and ``meta`` (JSON with
    ``step`` and ``metadata``).

    Args:
      directory: target directory; must not exist unless ``overwrite``.
      delta: the delta tree.
      opt_state: optimizer state, to resume training exactly.
      step: training step.
      metadata: JSON-serialisable extra information (e.g. ``method.config``).
      overwrite: replace an existing checkpoint.
    """
    directory = Path(directory).absolute()
    items = {"delta": ocp.args.StandardSave(delta),
             "meta": ocp.args.JsonSave({"step": step, "metadata": dict(metadata or {})})}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    with _checkpointer() as ckptr:
        ckptr.save(directory, args=ocp.args.Composite(**items), force=overwrite)
    return directory


def _stored_tree(directory: Path, item: str) -> Any:
    return ocp.StandardCheckpointHandler().metadata(directory / item)


def stored_like(directory: str | os.PathLike, item: str = "delta") -> Any:
    """The abstract tree (``jax.ShapeDtypeStruct`` leaves, nested dicts) that ``item`` of the
    checkpoint at ``directory`` holds, read from its metadata.

    For deltas whose shapes only the checkpoint knows, such as a stored sparse delta (the number
    of kept entries per tensor): ``restore(path, stored_like(path))``.
    """
    directory = Path(directory).absolute()
    if not (directory / item).is_dir():
        raise FileNotFoundError(f"no item {item!r} in a jpeft checkpoint at {directory}")
    flat = paths_lib.flatten(_stored_tree(directory, item))
    return paths_lib.unflatten({p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
                                for p, m in flat.items()})


def metadata(directory: str | os.PathLike) -> dict:
    """The ``{"step": ..., "metadata": ...}`` JSON written by :func:`save`."""
    directory = Path(directory).absolute()
    with _checkpointer() as ckptr:
        out = ckptr.restore(directory, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"])


def _check_shapes(stored: Any, like: Any, name: str) -> None:
    got = {paths_lib.path_str(p): v for p, v in paths_lib.flatten(stored).items()}
    want = {paths_lib.path_str(p): v for p, v in paths_lib.flatten(like).items()}
    problems = []
    for k in sorted(set(want) - set(got)):
        problems.append(f"missing in checkpoint: {name}/{k}")
    for k in sorted(set(got) - set(want)):
        problems.append(f"not expected: {name}/{k} {tuple(got[k].shape)}")
    for k in sorted(set(got) & set(want)):
        gs, ws = tuple(got[k].shape), tuple(want[k].shape)
        if gs != ws:
            problems.append(f"{name}/{k}: checkpoint has shape {gs}, expected {ws}")
    if problems:
        raise ValueError("checkpoint does not fit the tree to restore into:\n  " +
                         "\n  ".join(problems[:20]))


def restore(directory: str | os.PathLike, delta_like: Any, *, opt_state_like: Any = None
            ) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`.

    Args:
      directory: checkpoint directory.
      delta_like: a tree with the delta's structure, shapes and dtypes (arrays or
        ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape(method.init, key, params)``); shardings on it
        place the restored arrays.
      opt_state_like: likewise for the optimizer state, when it is wanted.

    Returns:
      ``{"delta": ..., "step": ..., "metadata": ...}`` plus ``"opt_state"`` when asked for.

    Raises:
      FileNotFoundError: no checkpoint at ``directory``.
      ValueError: naming every missing, unexpected or mis-shaped entry.
    """
    directory = Path(directory).absolute()
    if not (directory / "delta").is_dir():
        raise FileNotFoundError(f"no jpeft checkpoint at {directory}")
    items: dict[str, Any] = {"meta": ocp.args.JsonRestore()}
    wanted = {"delta": delta_like}
    if opt_state_like is not None:
        if not (directory / "opt_state").is_dir():
            raise ValueError(f"checkpoint {directory} holds no optimizer state")
        wanted["opt_state"] = opt_state_like
    for name, like in wanted.items():
        _check_shapes(_stored_tree(directory, name), like, name)
        items[name] = ocp.args.StandardRestore(_abstract(like))
    with _checkpointer() as ckptr:
        out = ckptr.restore(directory, args=ocp.args.Composite(**items))
    result = {name: out[name] for name in wanted}
    result["step"] = out["meta"]["step"]
    result["metadata"] = out["meta"]["metadata"]
    return result
