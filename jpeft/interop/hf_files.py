"""Hugging Face PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``,
read and written all or nothing, with one clear error per problem.

* :func:`write` writes both files into a temporary sibling directory and renames it into place
  (an existing adapter is set aside first and deleted only once the new one is complete).
* :func:`read` returns ``(config, tensors)``; a missing file, JSON that does not parse, a
  truncated or damaged safetensors file is a :class:`AdapterFileError` naming the file.
* :func:`checked` checks the config keys a reader reads against their types
  (:mod:`jpeft.core.schema`: a bool must be a JSON bool, an int not a bool, a regular expression
  RE2 syntax, ...) and fills in the defaults of missing optional ones; a missing required key or
  a value of the wrong type is an :class:`AdapterFileError` naming the file, the key, the value and
  the type expected. :class:`Tensors` hands out tensors by key and, at :meth:`Tensors.finish`,
  refuses any the reader did not take (naming them), so that nothing in a file is silently
  dropped.
* ``target_modules`` / ``exclude_modules`` strings are regular expressions matched with RE2
  (:func:`jpeft.core.paths.fullmatch`): linear time, so a file cannot hang the process.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from jpeft.core import schema
from jpeft.core.schema import Field, Pattern

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFileError(ValueError):
    """A Hugging Face PEFT adapter directory that cannot be read as asked; nothing was loaded."""


def write(directory: str | os.PathLike, config: dict, tensors: dict[str, np.ndarray], *,
          overwrite: bool = False) -> Path:
    """Write ``config`` and ``tensors`` as an adapter directory, atomically.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is false.
    """
    from safetensors.numpy import save_file
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists (pass overwrite=True to replace it)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                  str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read(directory: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """``(config, tensors)`` of an adapter directory.

    Raises:
      FileNotFoundError: no such directory or file.
      AdapterFileError: a config that is not a JSON object, or a damaged weights file.
    """
    from safetensors.numpy import load_file
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no {name} in {directory} (a Hugging Face PEFT adapter "
                                    f"directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{directory / CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{directory / CONFIG_FILE}: the config is {schema.shown(config)}; "
                               f"expected a JSON object")
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except Exception as e:      # noqa: BLE001 - safetensors raises several kinds for bad files
        raise AdapterFileError(f"{directory / WEIGHTS_FILE} cannot be read: damaged or truncated "
                               f"({type(e).__name__}: {e})") from None
    return config, tensors


#: The keys every adapter type reads.
COMMON = {"peft_type": Field(str), "modules_to_save": Field(list[str] | None, None)}
#: PEFT's module selection (:func:`selected_modules`), read by the tuner types.
SELECTION = {"target_modules": Field(Pattern | list[str]),
             "exclude_modules": Field(Pattern | list[str] | None, None),
             "layers_to_transform": Field(int | list[int] | None, None),
             "layers_pattern": Field(str | list[str] | None, None)}


def checked(config: dict, fields: dict[str, Field], directory: str | os.PathLike) -> dict:
    """``config`` with the keys of ``fields`` checked (:func:`jpeft.core.schema.check`) and the
    defaults of missing optional ones filled in; other keys are left as they are.

    Raises:
      AdapterFileError: a required key missing, or a value not of its key's type, naming the
        file, the key, the value and the type expected.
    """
    return schema.check(config, fields, str(Path(directory) / CONFIG_FILE), AdapterFileError)


class Tensors:
    """The tensors of a file, taken by key; :meth:`finish` refuses leftovers."""

    def __init__(self, tensors: dict[str, np.ndarray], where: str | os.PathLike):
        self._tensors = dict(tensors)
        self._taken: set[str] = set()
        self.directory = Path(where)
        self.where = self.directory / WEIGHTS_FILE

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def take(self, key: str, shape: tuple[int, ...] | None = None, what: str = "") -> np.ndarray:
        """The tensor ``key`` (its shape checked against ``shape`` when given)."""
        if key not in self._tensors:
            raise AdapterFileError(f"{self.where}: missing tensor {key!r}"
                                   + (f" ({what})" if what else ""))
        x = self._tensors[key]
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise AdapterFileError(f"{self.where}: {key} has shape {tuple(x.shape)}, expected "
                                   f"{tuple(shape)}" + (f" ({what})" if what else ""))
        self._taken.add(key)
        return x

    def finish(self, known: Iterable[str] = ()) -> None:
        """Refuse every tensor not taken (nor in ``known``)."""
        left = sorted(set(self._tensors) - self._taken - set(known))
        if left:
            raise AdapterFileError(f"{self.where}: tensors this reader does not know (another "
                                   f"adapter type or base model?): {left[:10]}"
                                   + (f" and {len(left) - 10} more" if len(left) > 10 else ""))


# --------------------------------------------------------------------------------------------
# The base's linear modules and PEFT's module selection


def linear_modules(variables: Any, sites: Any, collection: str = "params"
                   ) -> dict[str, tuple[tuple, int, int, Any]]:
    """``{module name: (kernel path, in, out, dtype)}`` of every 2-D weight of a dot contraction
    (one torch ``Linear`` each), ``in``/``out`` read from its contraction layout (with no sites:
    every rank-2 leaf named ``kernel``, taken as ``[in, out]``)."""
    from jpeft.core import paths as paths_lib
    out = {}
    for path, x in paths_lib.flatten(variables).items():
        if np.ndim(x) != 2:
            continue
        if sites is None:
            if path[-1] != "kernel":
                continue
            d_in, d_out = np.shape(x)
        else:
            layout = sites.contractions.get(path)
            if layout is None or layout.kind != "dot" or layout.stack:
                continue
            d_in, d_out = np.shape(x)[layout.contract[0]], np.shape(x)[layout.free[0]]
        out[module_name(path[:-1], collection)] = (path, int(d_in), int(d_out), x.dtype)
    return out


def targets_match(spec: str | list[str], name: str) -> bool:
    """PEFT's ``target_modules`` / ``exclude_modules`` match: a full regex match for a string
    (RE2: :func:`jpeft.core.paths.fullmatch`), the name or a ``.``-separated suffix of it for a
    list."""
    from jpeft.core import paths as paths_lib
    if isinstance(spec, str):
        return paths_lib.fullmatch(spec, name)
    return any(name == t or name.endswith("." + t) for t in spec)


def selected_modules(config: dict, names: Iterable[str], directory: str | os.PathLike
                     ) -> list[str]:
    """The module names PEFT's ``target_modules``, ``exclude_modules`` and
    ``layers_to_transform`` / ``layers_pattern`` select among ``names``; ``config`` is checked
    against :data:`SELECTION` here.

    Raises:
      AdapterFileError: no ``target_modules``, a key of the wrong type, or a selection of
        nothing.
    """
    from jpeft.core import paths as paths_lib
    config = checked(config, SELECTION, directory)
    names = sorted(names)
    targets = config["target_modules"]
    exclude = config["exclude_modules"]
    chosen = [n for n in names
              if targets_match(targets, n) and not (exclude and targets_match(exclude, n))]
    layers = config["layers_to_transform"]
    if layers is not None:
        layers = {layers} if isinstance(layers, int) else set(layers)
        pattern = config["layers_pattern"]
        if isinstance(pattern, list):
            pattern = pattern[0] if len(pattern) == 1 else None
        chosen = [n for n in chosen
                  if paths_lib.layer_index(tuple(n.split(".")), pattern) in layers]
    if not chosen:
        raise AdapterFileError(f"{Path(directory) / CONFIG_FILE}: target_modules {targets!r} "
                               f"select none of the base model's 2-D weights (e.g. {names[:5]})")
    return chosen


# --------------------------------------------------------------------------------------------
# modules_to_save: fully trained modules (a task head), stored merged


def module_name(path: tuple[str, ...], collection: str = "params") -> str:
    """A module path of the variables as a Hugging Face module name (collection left out)."""
    module = path[1:] if path[:1] == (collection,) else path
    return ".".join(module)


def saved_modules(variables: Any, head_delta: Any, prefix: str,
                  collection: str = "params") -> tuple[dict[str, np.ndarray], list[str]]:
    """``(tensors, names)``: the modules a ``full_finetune`` delta trains, merged into the base
    weights and named as Hugging Face does (``prefix + "classifier.weight"``, ...)."""
    from jpeft.core import paths as paths_lib
    from jpeft.methods.full import full_finetune
    from jpeft.models.loading import flax_to_hf_state
    merged = full_finetune().merge(variables, head_delta)
    touched = {p[:-1] for p in paths_lib.flatten(head_delta)}
    sub = paths_lib.unflatten({p[1:] if p[:1] == (collection,) else p: x
                               for p, x in paths_lib.flatten(merged).items() if p[:-1] in touched})
    tensors = {prefix + k: x for k, x in flax_to_hf_state(sub).items()}
    return tensors, sorted({module_name(p, collection) for p in touched})


def load_saved_modules(tensors: Tensors, variables: Any, names: Iterable[str], prefix: str,
                       collection: str = "params"):
    """``(method, delta)`` of the ``modules_to_save`` ``names`` found in ``tensors`` (taken from
    it) as a ``full_finetune`` part named ``"head"``; ``(None, None)`` when the file holds none.
    Names the base model lacks (PEFT lists ``"score"`` for every classifier) are ignored when the
    file holds no tensor for them."""
    from jpeft.core import paths as paths_lib
    from jpeft.methods.full import full_finetune
    from jpeft.models.loading import hf_state_to_flax
    names = list(dict.fromkeys(names or ()))
    state = {}
    for key in tensors.keys():
        if key.startswith(prefix) and any(key[len(prefix):].startswith(n + ".") for n in names):
            state[key[len(prefix):]] = tensors.take(key)
    if not state:
        return None, None
    base = variables[collection]
    try:
        loaded, report = hf_state_to_flax(state, base, base_model_prefix="")
    except ValueError as e:
        raise AdapterFileError(f"{tensors.where}: modules_to_save do not fit the base model: "
                               f"{e}") from None
    if report.unexpected:
        raise AdapterFileError(f"{tensors.where}: modules_to_save tensors that match no module of "
                               f"the base model: {list(report.unexpected)}")
    flat_loaded = paths_lib.flatten(loaded)
    missing = {tuple(m.split("/")) for m in report.missing}
    changed = [p for p in flat_loaded if p not in missing]
    modules = sorted({"/".join(p[:-1]) for p in changed})
    delta = paths_lib.unflatten({(collection,) + p: flat_loaded[p] for p in changed})
    return full_finetune(modules, name="head"), delta
