"""A trained method saved with its delta and loaded back by name, as Hugging Face PEFT's
``save_pretrained`` / ``from_pretrained`` do.

``jpeft.save(path, method, delta, model=record)`` writes a :mod:`jpeft.checkpoint` (atomic,
checksummed) in its one layout: the delta as its ``delta`` item, ``method.data`` (FAR's columns,
sparse entries) as its ``data`` item, and ``{"kind", "name", "config", "user"}`` as its metadata
(the method's name and config, the user's metadata; :func:`jpeft.checkpoint.written_by`):
:func:`jpeft.checkpoint.restore` reads that delta with the method's template.
``jpeft.load(path, params, sites, model=record)`` rebuilds the method from that config and data
alone (:func:`jpeft.methods.from_config`) and returns it with the delta, after checking

* the **model record**: what the delta was trained on beyond the weights' shapes (a BERT's
  pooling, its head and number of labels, the config, the dtypes: the JSON object of
  :func:`jpeft.models.loading.model_record`; ``load_hf_bert(...).record``). It is stored as the
  user metadata's ``"model"`` (the recipes record it there), and a base whose record differs is
  one :class:`jpeft.checkpoint.CheckpointError` naming each key, the saved value and the value
  found, and how to build the recorded base (:func:`check_model`): an adapter trained with mean
  pooling never runs silently on a CLS-pooling base;
* that the delta fits the method on ``params``: a checkpoint made for another base (other shapes,
  other module names) is one ``CheckpointError`` naming the entries.

A directory written by :func:`jpeft.checkpoint.save` (no method record) is one error saying what
it holds and to read it with :func:`jpeft.checkpoint.restore`.
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

KIND = checkpoint.KIND
#: The user metadata key that holds the model record (:func:`save`'s ``model``).
MODEL_KEY = "model"


class Loaded(NamedTuple):
    """What :func:`load` returns: the rebuilt ``method``, its ``delta``, and the checkpoint's
    ``step`` and user ``metadata`` (``model``: the model record saved with it, or ``None``)."""
    method: method_lib.Method
    delta: Any
    step: int | None
    metadata: dict

    @property
    def model(self) -> dict | None:
        """The model record the delta was trained on (:func:`save`'s ``model``), or ``None``."""
        return self.metadata.get(MODEL_KEY)


def _record(model: Any, where: str) -> dict:
    """``model`` as a model record: a JSON object of JSON scalars (str, number, bool, null).

    Raises:
      TypeError: anything else, naming ``where`` and the value.
    """
    scalar = (str, int, float, bool, type(None))
    if not isinstance(model, dict) or not all(
            isinstance(k, str) and isinstance(v, scalar) for k, v in model.items()):
        raise TypeError(f"{where}: the model record is {schema.shown(model)}; expected a JSON "
                        f"object of str, number, bool or null values, such as "
                        f"jpeft.models.loading.model_record(model) (load_hf_bert(...).record)")
    return dict(model)


def save(directory: str | os.PathLike, method: method_lib.Method, delta: Any, *,
         model: dict | None = None, step: int | None = None, metadata: dict | None = None,
         overwrite: bool = False) -> Path:
    """Write ``delta`` with what rebuilds ``method`` (its config and data) to ``directory``.

    ``model`` is the record of the model the delta was trained on (:func:`jpeft.models.loading.
    model_record`: pooling, head, config, dtypes), stored as ``metadata["model"]``; :func:`load`
    refuses a base whose record differs. Pass it: without it nothing guards the choices that
    change the function but not the weights' shapes (a BERT's pooling).

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is false.
      TypeError: a ``method.config`` that is not JSON-serialisable (the method could not be
        rebuilt); a ``model`` that is not a record.
      ValueError: a delta without arrays (nothing to save); ``model`` and a different
        ``metadata["model"]``.
    """
    if not jax.tree_util.tree_leaves(delta):
        raise ValueError(f"save: the delta of {method.name!r} holds no arrays; there is nothing to "
                         f"save (did its targets select nothing?)")
    try:
        config = json.loads(json.dumps(method.config))
    except TypeError as e:
        raise TypeError(f"save: the config of method {method.name!r} is not JSON-serialisable "
                        f"({e}); it could not be rebuilt from the checkpoint") from None
    user = dict(metadata or {})
    if model is not None:
        if user.get(MODEL_KEY, model) != model:
            raise ValueError(f"save: model={model!r} and metadata['model']="
                             f"{user[MODEL_KEY]!r} differ; pass the record once")
        user[MODEL_KEY] = model
    if MODEL_KEY in user:
        user[MODEL_KEY] = _record(user[MODEL_KEY], "save")
    data = None if method.data is None else jax.tree_util.tree_map(np.asarray, method.data)
    meta = {"kind": KIND, "name": method.name, "config": config, "user": user}
    return checkpoint.save(directory, delta, data=data, step=step, metadata=meta,
                           overwrite=overwrite)


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
    if meta["method"] is None:
        raise checkpoint.CheckpointError(
            f"{directory} was not written by jpeft.save: it holds {meta['holds']}; there is no "
            f"method to rebuild. Restore it with jpeft.checkpoint.restore(path, template), the "
            f"template being the delta's tree (jax.eval_shape of its method's init)")
    where = f"checkpoint {Path(directory).absolute()} (jpeft.save's method config)"
    config = check_config(meta["method"].get("config"), where)
    if meta["method"].get("nested"):
        return _read_nested(directory, config, meta)
    user = meta["method"]["user"]
    if MODEL_KEY in user:
        try:
            _record(user[MODEL_KEY], where)
        except TypeError as e:
            raise checkpoint.CheckpointError(str(e)) from None
    stored = checkpoint.restore(directory, checkpoint.stored_like(directory),
                                data_like=_stored_data(directory))
    data = stored.get("data")
    if data is not None:
        data = jax.tree_util.tree_map(np.asarray, data)
    from jpeft.methods import from_config
    return Loaded(from_config(config, data), stored["delta"], meta["step"], user)


def _read_nested(directory, config: dict, meta: dict) -> Loaded:
    """A checkpoint of jpeft.save's layout before the one layout
    (:data:`jpeft.checkpoint.NESTED_KIND`): ``{"delta": delta, "data": data}`` stored as the
    delta item, the user's metadata under ``metadata["user"]``."""
    stored = checkpoint.restore(directory, checkpoint.stored_like(directory))["delta"]
    data = stored.get("data")
    data = None if data is None else jax.tree_util.tree_map(np.asarray, data)
    from jpeft.methods import from_config
    return Loaded(from_config(config, data), stored["delta"], meta["step"],
                  meta["method"]["user"])


def _stored_data(directory) -> Any:
    """The abstract tree of the checkpoint's ``data`` item, or ``None`` when it has none."""
    try:
        return checkpoint.stored_like(directory, "data")
    except FileNotFoundError:
        return None


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


def load(directory: str | os.PathLike, params: Any, sites: Any = None, *,
         model: dict | None = None) -> Loaded:
    """The method saved at ``directory`` (by :func:`save`), rebuilt, and its delta, checked
    against the base: its model record, then its ``params``.

    Args:
      directory: a checkpoint written by :func:`save`.
      params: the base weights the delta is for (only their structure, shapes and dtypes are read).
      sites: the model's sites (:func:`jpeft.probe`) for methods that need them.
      model: the record of the base model (:func:`jpeft.models.loading.model_record`,
        ``load_hf_bert(...).record``); required when the checkpoint records one
        (:func:`check_model`).

    Raises:
      FileNotFoundError: no checkpoint at ``directory``.
      CheckpointError: not a :func:`save` checkpoint (saying what it holds), damaged files, a
        model record that differs from the saved one or is missing (:func:`check_model`), or a
        delta that does not fit the rebuilt method on ``params`` (naming the entries).
    """
    loaded = read(directory)
    check_model(loaded.model, model, directory)
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


def check_model(saved: dict | None, found: dict | None, where: Any) -> None:
    """Check the model record ``found`` (of the base about to run a delta) against the one
    ``saved`` with the delta. Nothing to check when nothing was saved.

    Raises:
      CheckpointError: a saved record and no ``found`` one; or records that differ: each key
        with the saved value and the value found, and the call that builds the recorded base
        (:func:`jpeft.models.loading.rebuild_hint`, e.g. ``load_hf_bert(model_dir,
        pooling='mean')``).
    """
    if saved is None:
        return
    if found is None:
        raise checkpoint.CheckpointError(
            f"{where} records the model its delta was trained on ({_shown_record(saved)}); pass "
            f"model= the record of the base you load it onto (jpeft.models.loading.model_record"
            f"(model), or load_hf_bert(...).record), so that a base that computes another "
            f"function is refused instead of predicting silently wrong")
    found = _record(found, "model")
    missing = object()
    diffs = [k for k in sorted(saved.keys() | found.keys())
             if saved.get(k, missing) != found.get(k, missing)]
    if not diffs:
        return
    shown = lambda r, k: repr(r[k]) if k in r else "(absent)"
    lines = [f"{k}: saved {shown(saved, k)}, found {shown(found, k)}" for k in diffs]
    from jpeft.models.loading import rebuild_hint
    raise checkpoint.CheckpointError(
        f"{where} was trained on another model than the base given: its delta would compute "
        f"another function (wrong predictions, no error):\n  " + "\n  ".join(lines)
        + f"\nbuild the base as recorded: {rebuild_hint(saved, diffs)}")


def _shown_record(record: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in record.items())


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
