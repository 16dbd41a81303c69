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

import inspect
import json
import os
import typing
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from jpeft import checkpoint
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import schema

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
    where = f"checkpoint {Path(directory).absolute()} (jpeft.save's method config)"
    config = check_config(info.get("config"), where)
    stored = checkpoint.restore(directory, checkpoint.stored_like(directory))["delta"]
    data = stored.get("data")
    if data is not None:
        data = jax.tree_util.tree_map(np.asarray, data)
    from jpeft.methods import from_config
    return Loaded(from_config(config, data), stored["delta"], meta["step"],
                  info.get("user", {}))


# --------------------------------------------------------------------------------------------
# The saved config, checked against each method's declared fields


#: JSON forms of parameters annotated ``Any`` (or not at all) that every method stores alike.
_JSON_FORMS = {"dtype": str | None, "compute_dtype": str | None}


def _declared() -> dict[str, tuple[Callable, tuple[str, ...], dict[str, Any]]]:
    """``{kind: (factory, parameters not stored, stored keys that are not parameters (or are
    stored in another form) with their types)}`` for every ``method.config["method"]``."""
    from jpeft.core import sparse
    from jpeft.methods import (adalora, adapters, bitfit, diff_pruning, far, fishmask, full, ia3,
                               intrinsic, lora, prefix, prompt)
    derived = {"scaling": float}                            # alpha / r, recomputed
    projection = {"projection": str, "permutation": str}    # "fastfood", "feistel-<rounds>"
    counts = {"entries": int, "tensors": int}               # informative; the data defines it
    return {
        "lora": (lora.lora, (), derived),
        "adalora": (adalora.adalora, (), derived),
        "bitfit": (bitfit.bitfit, (), {}),
        "full": (full.full_finetune, (), {}),
        "diff_pruning": (diff_pruning.diff_pruning, (), {}),
        "did": (intrinsic.did, ("rounds",), projection),
        "said": (intrinsic.said, ("rounds",), projection),
        "bottleneck": (adapters.bottleneck, (), {}),
        "sparse_adapter": (adapters.bottleneck, (), {"masks": dict[str, dict]}),
        "ia3": (ia3.ia3, (), {}),
        "prefix": (prefix.prefix_tuning, (), {}),
        "prompt": (prompt.prompt_tuning, (), {"inputs": list[tuple[int | str, int]] | None}),
        "far": (far.far, ("columns",), {"columns_kept": dict[str, int]}),
        "sparse": (sparse.sparse_finetune, ("indices",), counts),
        "fishmask": (fishmask.fishmask, ("indices",), counts),
        "sparse_stored": (sparse.stored_method, (), {}),
    }


def method_fields(kind: str) -> dict[str, schema.Field]:
    """The fields (all required) of a saved ``kind`` config: its factory's parameters with their
    annotated types (a module-path target's string is a regular expression:
    :data:`~jpeft.core.schema.Pattern`), the ``method`` key, and the declared extra keys.

    Raises:
      KeyError: an unknown ``kind``.
    """
    factory, skip, extra = _declared()[kind]
    hints = typing.get_type_hints(factory)
    fields = {"method": schema.Field(str)}
    for name, param in inspect.signature(factory).parameters.items():
        if name in skip or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(name, Any)
        if hint == paths_lib.Targets:
            hint = schema.Pattern | Sequence[str] | None
        elif hint is Any:
            hint = _JSON_FORMS.get(name, Any)
        fields[name] = schema.Field(hint)
    fields.update({k: schema.Field(t) for k, t in extra.items()})
    return fields


def check_config(config: Any, where: str, prefix: str = "") -> dict:
    """A saved ``method.config`` checked against its method's fields (:func:`method_fields`),
    part by part for ``compose`` / ``active``.

    Raises:
      CheckpointError: not a JSON object, an unknown method, a key missing, unknown or of the
        wrong type; naming ``where``, the key, the value and the type expected.
    """
    if not isinstance(config, dict):
        raise checkpoint.CheckpointError(f"{where}: the config{f' {prefix[:-1]!r}' if prefix else ''}"
                                         f" is {schema.shown(config)}; expected a JSON object")
    for key in ("compose", "active"):
        if key in config:
            parts = schema.check(config, {key: schema.Field(dict[str, dict])}, where,
                                 checkpoint.CheckpointError, refuse_unknown=True,
                                 key_prefix=prefix)[key]
            return {key: {n: check_config(c, where, f"{prefix}{key}.{n}.")
                          for n, c in parts.items()}}
    kind = schema.check(config, {"method": schema.Field(str)}, where, checkpoint.CheckpointError,
                        key_prefix=prefix)["method"]
    declared = _declared()
    if kind not in declared:
        raise checkpoint.CheckpointError(
            f"{where}: key {prefix + 'method'!r} is {kind!r}, which no jpeft method is (known: "
            f"{sorted(declared)})")
    return schema.check(config, method_fields(kind), where, checkpoint.CheckpointError,
                        refuse_unknown=True, key_prefix=prefix)


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
