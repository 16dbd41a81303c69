"""Saving and restoring delta trees (and optimizer state) with orbax, crash-safe and verified.

Only the delta is written, never the frozen base: a LoRA checkpoint of MiniLM is a few hundred KB.

A checkpoint is a directory with the orbax items ``delta`` (and ``opt_state``), plus ``meta``: a
JSON item with ``step``, the user's ``metadata`` and, per array, its shape, dtype and CRC-32 of its
bytes (``entries``).

**Nothing is lost** (:func:`save`). Every save, overwrites included, writes a complete checkpoint
under a temporary sibling name (``.<name>.jpeft-tmp-<id>``) and only then puts it in place:
a new checkpoint by one ``rename``; an overwrite by renaming the old one aside
(``.<name>.jpeft-old-<id>``), the new one in, and deleting the old one. A save killed at any
moment leaves either the old checkpoint or the new one complete; the next :func:`save`,
:func:`restore`, :func:`metadata` or :func:`stored_like` of that path finishes or undoes the
interrupted one (:func:`recover`: the newest complete version goes in place, leftovers are deleted)
and never takes a partial temporary for a checkpoint. Local (POSIX) file systems, one writer per
path, one process (multi-host saves: use :class:`Manager`, which lets orbax coordinate hosts).

**Nothing is half-loaded** (:func:`restore`). Before reading, every entry's shape and dtype are
compared with the tree to restore into; after reading, every array's CRC-32 with the one recorded
at save. Any mismatch, a truncated or unreadable file, or a damaged ``meta`` raises one
:class:`CheckpointError` naming the entries (or the item) and nothing is returned.

Training runs: :class:`Manager` (orbax's ``CheckpointManager``: keep the last ``N``, save every
``K`` steps, resume the latest complete step; same items and checks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "jpeft-checkpoint/2"
ITEMS = ("delta", "opt_state")
_TMP, _OLD = ".jpeft-tmp-", ".jpeft-old-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored as asked: missing, damaged, or not fitting the tree."""


# --------------------------------------------------------------------------------------------
# Entries: names, layout and checksums of a tree's arrays


def _entries(tree: Any) -> dict[str, Any]:
    """``{name: leaf}`` with ``name`` the leaf's key path (``"['a']['b']"`` style for any node)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_name(kp): leaf for kp, leaf in leaves}


def _name(keypath) -> str:
    from jpeft.core import paths as paths_lib
    return "/".join(paths_lib.to_path(keypath))


def crc32(x: Any) -> int:
    """CRC-32 of an array's bytes (C order; the array is brought to the host)."""
    return zlib.crc32(np.ascontiguousarray(np.asarray(x)).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def _describe(tree: Any) -> dict[str, dict]:
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.dtype(v.dtype)), "crc32": crc32(v)}
            for k, v in _entries(tree).items()}


def _check_layout(stored: dict[str, dict], like: Any, item: str) -> None:
    want = {k: (tuple(np.shape(v)), np.dtype(v.dtype)) for k, v in _entries(like).items()}
    problems = [f"missing in checkpoint: {item}/{k}" for k in want if k not in stored]
    problems += [f"not expected: {item}/{k} {tuple(s['shape'])}" for k, s in stored.items()
                 if k not in want]
    for k in want.keys() & stored.keys():
        shape, dtype = tuple(stored[k]["shape"]), np.dtype(stored[k]["dtype"])
        if shape != want[k][0]:
            problems.append(f"{item}/{k}: checkpoint has shape {shape}, expected {want[k][0]}")
        elif dtype != want[k][1]:
            problems.append(f"{item}/{k}: checkpoint has dtype {dtype}, expected {want[k][1]}")
    if problems:
        raise CheckpointError("checkpoint does not fit the tree to restore into:\n  "
                              + "\n  ".join(sorted(problems)[:20]))


def _verify(stored: dict[str, dict], restored: Any, item: str, directory: Path) -> None:
    bad = [k for k, v in _entries(restored).items() if crc32(v) != stored[k]["crc32"]]
    if bad:
        raise CheckpointError(f"checkpoint {directory} is damaged: the bytes of "
                              f"{', '.join(f'{item}/{k}' for k in bad[:10])} differ from those "
                              f"saved (CRC-32 mismatch); nothing was restored")


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
        else jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)),
        tree)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """orbax and tensorstore log every failed read at ERROR with long traces; the failure is
    raised as one :class:`CheckpointError` instead."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "jax._src.distributed")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _items_args(delta: Any, opt_state: Any, meta: dict) -> ocp.args.Composite:
    items = {"delta": ocp.args.StandardSave(delta), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    return ocp.args.Composite(**items)


def _meta(delta: Any, opt_state: Any, step: int | None, metadata: dict | None) -> dict:
    entries = {"delta": _describe(delta)}
    if opt_state is not None:
        entries["opt_state"] = _describe(opt_state)
    return {"format": FORMAT, "step": step, "metadata": dict(metadata or {}), "entries": entries}


def _read_meta(directory: Path) -> dict:
    try:
        with _quiet(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            meta = dict(ckptr.restore(directory, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:      # noqa: BLE001 - any failure to read is one clear error
        raise CheckpointError(f"checkpoint {directory}: its meta item cannot be read "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
                              ) from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("entries"), dict):
        raise CheckpointError(f"{directory} is not a {FORMAT} checkpoint (meta format "
                              f"{meta.get('format')!r})")
    return meta


def _restore_items(directory: Path, meta: dict, wanted: dict[str, Any],
                   restore=None) -> dict[str, Any]:
    """Check layouts, read ``wanted`` items, verify checksums: the restored items."""
    for item, like in wanted.items():
        if item not in meta["entries"]:
            raise CheckpointError(f"checkpoint {directory} holds no {item}")
        _check_layout(meta["entries"][item], like, item)
    args = ocp.args.Composite(**{item: ocp.args.StandardRestore(_abstract(like))
                                 for item, like in wanted.items()})
    try:
        with _quiet():
            if restore is None:
                with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
                    out = ckptr.restore(directory, args=args)
            else:
                out = restore(args)
    except Exception as e:      # noqa: BLE001
        raise CheckpointError(f"checkpoint {directory} is damaged: {', '.join(wanted)} cannot be "
                              f"read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); nothing was "
                              f"restored") from None
    for item in wanted:
        _verify(meta["entries"][item], out[item], item, directory)
    return {item: out[item] for item in wanted}


# --------------------------------------------------------------------------------------------
# One checkpoint directory: save, recover, restore


def _siblings(directory: Path, marker: str) -> list[Path]:
    prefix = f".{directory.name}{marker}"
    if not directory.parent.is_dir():
        return []
    return sorted((p for p in directory.parent.iterdir() if p.name.startswith(prefix)),
                  key=lambda p: p.stat().st_mtime_ns)


def _complete(path: Path) -> bool:
    """A finished save: the orbax directory is in place (orbax renames it there last) and its
    meta item parses."""
    try:
        _read_meta(path)
        return True
    except CheckpointError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(directory: str | os.PathLike) -> bool:
    """Finish or undo a save of ``directory`` that was killed: if ``directory`` is missing, the
    newest complete temporary (else the old version set aside) is renamed into place; every
    other leftover temporary is deleted. Returns whether anything was left over. Called by every
    function here that touches a checkpoint path."""
    directory = Path(directory).absolute()
    leftovers = _siblings(directory, _TMP) + _siblings(directory, _OLD)
    if not leftovers:
        return False
    if not directory.exists():
        for candidate in _siblings(directory, _TMP)[::-1] + _siblings(directory, _OLD)[::-1]:
            if _complete(candidate):
                os.rename(candidate, directory)
                _fsync_dir(directory.parent)
                break
    for p in leftovers:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)
    return True


def save(directory: str | os.PathLike, delta: Any, *, opt_state: Any = None,
         step: int | None = None, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``delta`` (and optionally ``opt_state`` and ``step``) to ``directory``, atomically.

    Args:
      directory: target directory; must not exist unless ``overwrite``.
      delta: the delta tree.
      opt_state: optimizer state, to resume training exactly.
      step: training step.
      metadata: JSON-serialisable extra information (e.g. ``method.config``).
      overwrite: replace an existing checkpoint (the old one stays until the new one is complete).

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is false.
    """
    directory = Path(directory).absolute()
    recover(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = directory.parent / f".{directory.name}{_TMP}{token}"
    meta = _meta(delta, opt_state, step, metadata)
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(tmp, args=_items_args(delta, opt_state, meta))
        _fsync_dir(directory.parent)
        if directory.exists():
            old = directory.parent / f".{directory.name}{_OLD}{token}"
            os.rename(directory, old)
            os.rename(tmp, directory)
            _fsync_dir(directory.parent)
            shutil.rmtree(old)
        else:
            os.rename(tmp, directory)
            _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _checked_dir(directory: str | os.PathLike) -> Path:
    directory = Path(directory).absolute()
    recover(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no jpeft checkpoint at {directory}")
    return directory


def metadata(directory: str | os.PathLike) -> dict:
    """``{"step": ..., "metadata": ...}`` as written by :func:`save`."""
    meta = _read_meta(_checked_dir(directory))
    return {"step": meta["step"], "metadata": meta["metadata"]}


def stored_like(directory: str | os.PathLike, item: str = "delta") -> Any:
    """The abstract tree (``jax.ShapeDtypeStruct`` leaves, nested dicts) that ``item`` of the
    checkpoint at ``directory`` holds, read from its metadata.

    For deltas whose shapes only the checkpoint knows, such as a stored sparse delta (the number
    of kept entries per tensor): ``restore(path, stored_like(path))``.
    """
    directory = _checked_dir(directory)
    entries = _read_meta(directory)["entries"]
    if item not in entries:
        raise FileNotFoundError(f"no item {item!r} in the jpeft checkpoint at {directory}")
    from jpeft.core import paths as paths_lib
    return paths_lib.unflatten({tuple(k.split("/")): jax.ShapeDtypeStruct(
        tuple(e["shape"]), np.dtype(e["dtype"])) for k, e in entries[item].items()})


def restore(directory: str | os.PathLike, delta_like: Any, *, opt_state_like: Any = None
            ) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`, all or nothing.

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
      CheckpointError (a ``ValueError``): every missing, unexpected, mis-shaped or mis-typed entry;
        or damaged files (an unreadable item, an array whose bytes differ from those saved).
    """
    return _restore_dir(_checked_dir(directory), delta_like, opt_state_like)


def _restore_dir(directory: Path, delta_like: Any, opt_state_like: Any) -> dict[str, Any]:
    """:func:`restore` of one complete checkpoint directory (a save's, or a Manager step's)."""
    meta = _read_meta(directory)
    wanted = {"delta": delta_like}
    if opt_state_like is not None:
        wanted["opt_state"] = opt_state_like
    out = _restore_items(directory, meta, wanted)
    return {**out, "step": meta["step"], "metadata": meta["metadata"]}


# --------------------------------------------------------------------------------------------
# Training runs


_TRASH = ".jpeft-deleted"   # steps renamed out of the run, then deleted


class Manager:
    """Checkpoints of a training run under one directory (orbax ``CheckpointManager``): a save
    every ``every`` steps, the last ``keep`` kept, resume from the latest complete one.

    ``manager.save(step, delta, opt_state)`` writes step ``step`` when ``step % every == 0`` (or
    ``force``); ``manager.latest()`` is the newest complete step (``None`` if none); and
    ``manager.restore(delta_like, opt_state_like)`` reads it, with the layout and checksum checks
    of :func:`restore`. orbax writes each step under a temporary name and renames it when
    complete, so a run killed at any moment resumes from its last complete step; leftovers of an
    interrupted save are deleted when the manager opens the directory. A step beyond ``keep`` is
    first renamed into ``.jpeft-deleted/`` and only then deleted, so a run killed while it
    deletes never leaves a half-deleted step under a step's name (one extra complete step may
    remain, removed by the next save). Saves are synchronous.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, every: int = 1):
        if keep < 1 or every < 1:
            raise ValueError(f"Manager: keep and every must be >= 1, got keep={keep}, "
                             f"every={every}")
        self.directory = Path(directory).absolute()
        self.every = every
        self._trash = self.directory / _TRASH
        self._empty_trash()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=False,
            cleanup_tmp_directories=True, create=True, todelete_subdir=_TRASH)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("delta", "opt_state", "meta"))

    def _empty_trash(self) -> None:
        shutil.rmtree(self._trash, ignore_errors=True)

    def save(self, step: int, delta: Any, opt_state: Any = None, *,
             metadata: dict | None = None, force: bool = False) -> bool:
        """Save ``step`` if it is due (``step % every == 0``) or ``force``; whether it saved."""
        if not force and step % self.every:
            return False
        meta = _meta(delta, opt_state, step, metadata)
        saved = bool(self._mngr.save(step, args=_items_args(delta, opt_state, meta), force=True))
        self._empty_trash()
        return saved

    def steps(self) -> list[int]:
        """The complete steps on disk, oldest first."""
        return sorted(self._mngr.all_steps())

    def latest(self) -> int | None:
        """The newest complete step, or ``None``."""
        return self._mngr.latest_step()

    def restore(self, delta_like: Any, opt_state_like: Any = None, *,
                step: int | None = None) -> dict[str, Any]:
        """Step ``step`` (default the latest) as :func:`restore` returns it.

        Raises:
          FileNotFoundError: no complete step.
          CheckpointError: as :func:`restore`.
        """
        step = self.latest() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory}")
        return _restore_dir(self.directory / str(step), delta_like, opt_state_like)

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> "Manager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
