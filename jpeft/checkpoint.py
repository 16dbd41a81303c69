"""Saving and restoring delta trees (and optimizer state) with orbax, crash-safe and verified.

Only the delta is written, never the frozen base: a LoRA checkpoint of MiniLM is a few hundred KB.

A checkpoint is a directory with the orbax items ``delta`` (and ``opt_state``, and ``data``: the
arrays that define a method, such as FAR's columns), plus ``meta``: a JSON item with ``step``, the
user's ``metadata`` and, per array, its shape, dtype and CRC-32 of its bytes (``entries``). There
is one layout: :func:`jpeft.save` writes the same items (the delta as ``delta``, the method's data
as ``data``) with the method's name and config in ``metadata`` (``{"kind": KIND, "name",
"config", "user"}``, :func:`written_by`), so :func:`restore` reads its delta with the method's
template, and :func:`jpeft.load` says what a bare checkpoint holds.

**Nothing is lost** (:func:`save`). Every save, overwrites included, writes a complete checkpoint
under a temporary sibling folder named after its owner (``.<name>.jpeft-tmp-<host>-<pid>-<start>-
<id>``) and only then puts it in place: a new checkpoint by a rename that refuses an existing one
(two racing saves: exactly one wins, the other raises ``FileExistsError``); an overwrite by an
atomic exchange of the two folders (where the file system has none: the old one renamed aside into
the temporary, the new one in, the old one back if that fails), then the old one is deleted. A
save that fails (full disk, any I/O error) deletes all it wrote, orbax's own temporary included,
and raises one :class:`CheckpointError`; the old checkpoint is untouched. A save killed at any
moment leaves either the old checkpoint or the new one complete; the next :func:`save`,
:func:`restore`, :func:`metadata` or :func:`stored_like` of that path finishes or undoes it
(:func:`recover`: the newest complete version goes in place, leftovers are deleted), and never
takes a partial temporary for a checkpoint. Only temporaries whose process is provably gone (same
host, pid no longer alive with the same start time) are touched: a save running in another process
is never disturbed by readers or writers, and leftovers of another host are reported
(:class:`CheckpointWarning`), not deleted. Local (POSIX) file systems; multi-host saves: use
:class:`Manager`, which lets orbax coordinate hosts.

**Nothing is half-loaded** (:func:`restore`). Before reading, every entry's shape and dtype are
compared with the tree to restore into; after reading, every array's CRC-32 with the one recorded
at save. Any mismatch, a truncated or unreadable file, or a damaged ``meta`` raises one
:class:`CheckpointError` naming the entries (or the item) and nothing is returned. A template of
another method (other leaf names than those stored) is one message naming the stored method and
the template's, and a :func:`jpeft.save` directory that does not fit says to read it with
:func:`jpeft.load`.

Training runs: :class:`Manager` (orbax's ``CheckpointManager``: keep the last ``N``, save every
``K`` steps, resume the latest complete step; same items and checks).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT = "jpeft-checkpoint/2"
ITEMS = ("delta", "opt_state", "data")
_TMP = ".jpeft-tmp-"
_LEGACY_OLD = ".jpeft-old-"   # where earlier versions set an overwritten checkpoint aside


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored as asked (missing, damaged, or not fitting the tree),
    or a save that failed (and left nothing behind)."""


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
    """CRC-32 of an array's bytes (C order; the array is brought to the host). A ``jax.Array``
    sharded across processes (multi-host) is gathered to every host first
    (``multihost_utils.process_allgather``, a collective: every process computes the checksums
    of the same arrays in the same order, as :class:`Manager`'s save and restore do), one leaf
    at a time: the host holds one whole leaf transiently."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return zlib.crc32(np.ascontiguousarray(np.asarray(x)).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def _describe(tree: Any) -> dict[str, dict]:
    return {k: {"shape": list(np.shape(v)), "dtype": str(np.dtype(v.dtype)), "crc32": crc32(v)}
            for k, v in _entries(tree).items()}


def _layout_problems(stored: dict[str, dict], like: Any, item: str) -> list[str]:
    """Every entry of ``like`` missing from ``stored`` (the checkpoint's entries of ``item``),
    every stored entry ``like`` lacks, and every shape or dtype that differs; sorted."""
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
    return sorted(problems)


#: Leaf names that one kind of method makes (for messages only: what a tree looks like).
_SIGNATURE_LEAVES = {"lora_E": "adalora", "gate": "unipelt (gated lora)", "lora_A": "lora",
                     "ia3_l": "ia3", "prefix_keys": "prefix", "prompt": "prompt",
                     "theta_d": "said/did", "phm_rule": "compacter", "down": "adapter",
                     "alpha": "diff_pruning"}


def _leaf_names(names: Any) -> set[str]:
    return {n.rsplit("/", 1)[-1] for n in names}


def looks_like(names: Any) -> str:
    """What a delta with entries ``names`` (``"a/b/leaf"`` paths) looks like, for messages: the
    method its leaf names suggest (``"lora"``, ``"ia3"``, ...) and the leaf names, e.g.
    ``"lora (leaves lora_A, lora_B)"``, with the top-level parts of a composition."""
    names = list(names)
    leaves = _leaf_names(names)
    kinds = [k for leaf, k in _SIGNATURE_LEAVES.items() if leaf in leaves]
    tops = sorted({n.split("/", 1)[0] for n in names})
    kind = kinds[0] if kinds else "a method without adapter leaves (full, bitfit, sparse, far)"
    parts = f", top-level keys {', '.join(tops)}" if len(tops) > 1 or tops[:1] != ["params"] else ""
    return f"{kind} (leaves {', '.join(sorted(leaves)[:8])}{parts})"


#: ``metadata["kind"]`` of a checkpoint written by :func:`jpeft.save`: the delta as the ``delta``
#: item, the method's data as ``data``; ``metadata`` holds the method's ``name`` and ``config``
#: and the user's metadata (``user``).
KIND = "jpeft-method/2"
#: ``metadata["kind"]`` of one written by jpeft.save before the one layout: ``{"delta": delta,
#: "data": data}`` stored as the ``delta`` item. :func:`jpeft.load` still reads it.
NESTED_KIND = "jpeft-method"


def _config_name(config: Any) -> str:
    """A method's name from its saved config: ``"a+b"`` for a composition of parts ``a``, ``b``."""
    if isinstance(config, dict):
        for key in ("compose", "active"):
            if isinstance(config.get(key), dict):
                return "+".join(config[key])
        return str(config.get("method"))
    return "?"


def written_by(meta: dict) -> dict | None:
    """What rebuilds the method of a checkpoint written by :func:`jpeft.save`: ``{"name",
    "config", "user", "nested"}`` (``nested``: the layout before, :data:`NESTED_KIND`), or
    ``None`` for a bare :func:`save`."""
    info = meta.get("metadata")
    if not isinstance(info, dict) or info.get("kind") not in (KIND, NESTED_KIND):
        return None
    user = info.get("user")
    return {"name": info.get("name") or _config_name(info.get("config")),
            "config": info.get("config"), "user": user if isinstance(user, dict) else {},
            "nested": info["kind"] == NESTED_KIND}


def holds(meta: dict) -> str:
    """What a checkpoint holds, in words: ``"method 'lora+head' (written by jpeft.save)"``, or
    a bare delta with its number of arrays and what they look like (:func:`looks_like`)."""
    method = written_by(meta)
    if method is not None:
        return f"method {method.get('name')!r} (written by jpeft.save)"
    delta = meta["entries"].get("delta", {})
    return (f"a bare delta of {len(delta)} arrays that looks like {looks_like(delta)} (written "
            f"by jpeft.checkpoint.save, without a method config)")


def _misfit(directory: Path, meta: dict, item: str, like: Any, problems: list[str]) -> str:
    """The message for a tree ``like`` that does not fit ``item`` of the checkpoint: another
    method (its leaf names differ: both methods named, no list), or the entries that differ,
    with the reader that fits a :func:`jpeft.save` directory."""
    stored, wanted = meta["entries"][item], list(_entries(like))
    method = written_by(meta)
    if method is not None:
        way = (f"this directory was written by jpeft.save (method {method.get('name')!r}); read "
               f"it with jpeft.load(path, params, sites), which rebuilds the method and checks "
               f"its delta against the base")
    else:
        way = ("restore it with a template of the stored method's delta "
               "(jax.eval_shape(lambda k: method.init(k, params, sites), key))")
    if item == "delta" and _leaf_names(stored) != _leaf_names(wanted):
        what = (f"method {method.get('name')!r} (leaves {', '.join(sorted(_leaf_names(stored)))})"
                if method is not None else f"a delta that looks like {looks_like(stored)}")
        return (f"checkpoint {directory} holds {what}; the template is of another method: "
                f"{looks_like(wanted)}. {way[0].upper()}{way[1:]}")
    return (f"checkpoint {directory} does not fit the tree to restore into ({way}):\n  "
            + "\n  ".join(problems[:20]))


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


def _items_args(trees: dict[str, Any], meta: dict) -> ocp.args.Composite:
    """The orbax items: each tree of ``trees`` (``delta`` and those given of :data:`ITEMS`) and
    the JSON ``meta``."""
    items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
    return ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta))


def _trees(delta: Any, **items: Any) -> dict[str, Any]:
    """``{"delta": delta}`` plus the other items of :data:`ITEMS` that are not ``None``."""
    return {"delta": delta, **{k: v for k, v in items.items() if v is not None}}


def _meta(trees: dict[str, Any], step: int | None, metadata: dict | None) -> dict:
    return {"format": FORMAT, "step": step, "metadata": dict(metadata or {}),
            "entries": {name: _describe(tree) for name, tree in trees.items()}}


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
            raise CheckpointError(f"checkpoint {directory} holds no {item} (it holds "
                                  f"{holds(meta)})")
        problems = _layout_problems(meta["entries"][item], like, item)
        if problems:
            raise CheckpointError(_misfit(directory, meta, item, like, problems))
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
        raise CheckpointError(_read_failure(directory, meta, wanted, e)) from None
    for item in wanted:
        _verify(meta["entries"][item], out[item], item, directory)
    return {item: out[item] for item in wanted}


def _read_failure(directory: Path, meta: dict, wanted: dict[str, Any], e: Exception) -> str:
    """The message for items that orbax cannot read: the entries tensorstore names (by the tree
    path of the array, e.g. ``delta/layer/lora_a``), or else the items, and the cleaned cause."""
    text = " ".join(str(e).split())
    names = {}                                  # orbax's key ("a.b") -> "item/a/b"
    for item in wanted:
        for name in meta["entries"].get(item, {}):
            names.setdefault((item, name.replace("/", ".")), f"{item}/{name}")
    found = []
    for key, db in re.findall(r'Error reading "([^"]*)" in OCDBT database at local file '
                              r'"([^"]*)"', text):
        key = key.rpartition("/")[0] if "/" in key else key
        entry = names.get((Path(db).name, key))
        if entry and entry not in found:
            found.append(entry)
    cause = _clean(_tensorstore_cause(text)) or type(e).__name__
    what = ", ".join(found) if found else ", ".join(wanted)
    return (f"checkpoint {directory} is damaged: {what} cannot be read ({cause}); nothing was "
            f"restored")


# --------------------------------------------------------------------------------------------
# Temporaries and their owners
#
# A save writes under ``.<name>.jpeft-tmp-<owner>`` with ``<owner>`` = ``<host>-<pid>-<start>-<rand>``
# (``host``: a hash of hostname, boot id and pid namespace; ``start``: the process's start time in
# clock ticks since boot, so a reused pid is not taken for the owner). The owner is part of the
# name, so it is known from the moment the folder exists. Inside: ``owner.json`` (who, for
# messages), ``ckpt`` (orbax's output; orbax's own temporary lies beside it, inside the
# temporary) and, during an overwrite without an atomic exchange, ``old`` (the old checkpoint).

_CKPT, _ASIDE, _OWNER_FILE = "ckpt", "old", "owner.json"
_OWNER_RE = re.compile(r"^(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+$")


class CheckpointWarning(UserWarning):
    """A leftover of a save that may still be running elsewhere: left in place, and said so."""


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _host_key() -> str:
    """This host, boot and pid namespace: pids are comparable only between equal keys."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    ident = "|".join((socket.gethostname(), _read_text("/proc/sys/kernel/random/boot_id"), pidns))
    return hashlib.sha1(ident.encode()).hexdigest()[:8]


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; 0 where ``/proc`` is missing), or
    ``None`` if there is no such live process (zombies count as gone)."""
    if os.path.isdir("/proc/self"):
        fields = _read_text(f"/proc/{pid}/stat").rpartition(")")[2].split()
        if len(fields) < 20 or fields[0] in ("Z", "X"):
            return None
        return int(fields[19])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return 0


def _owner_token() -> str:
    pid = os.getpid()
    return f"{_host_key()}-{pid}-{_start_time(pid) or 0}-{uuid.uuid4().hex[:8]}"


def _owner_state(temp: Path, prefix: str) -> str:
    """``"running"`` (its owner lives here), ``"gone"`` (its owner provably ended: same host,
    no live process with that pid and start time), ``"elsewhere"`` (another host, boot or
    container: unknowable from here) or ``"unknown"`` (no owner in the name: an older jpeft)."""
    m = _OWNER_RE.match(temp.name[len(prefix):])
    if m is None:
        return "unknown"
    if m["host"] != _host_key():
        return "elsewhere"
    now = _start_time(int(m["pid"]))
    if now is None or (now and int(m["start"]) and now != int(m["start"])):
        return "gone"
    return "running"


def _new_temporary(directory: Path) -> Path:
    """Create this process's temporary for a save of ``directory``, with its owner record."""
    temp = directory.parent / f".{directory.name}{_TMP}{_owner_token()}"
    temp.mkdir()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "created": time.time()}
    (temp / _OWNER_FILE).write_text(json.dumps(owner))
    return temp


def _left_alone_message(temp: Path, directory: Path, state: str) -> str:
    try:
        owner = json.loads((temp / _OWNER_FILE).read_text())
        who = f"process {owner['pid']} on host {owner['host']!r}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "a process that cannot be identified"
    why = ("another host or container, whose processes cannot be checked from here"
           if state == "elsewhere" else "an older jpeft, which does not record the owner")
    return (f"{temp}: left by a save of {directory} by {who} ({why}); it is not removed "
            f"automatically, as that save may still be running. Once it is not, delete it by hand"
            f" (if {directory} is missing, first move a complete checkpoint in it to {directory})")


# Atomic renames: renameat2(2) flags; without renameat2 (not Linux, old libc, some file systems)
# a checked os.rename is used instead.
_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


@functools.lru_cache(maxsize=None)
def _libc_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``: ``True`` when done, ``False`` when this system or file
    system does not offer it; any other failure raises its ``OSError`` (``FileExistsError``
    when ``RENAME_NOREPLACE`` meets an existing ``dst``)."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists, decided atomically by
    the kernel (without renameat2: ``os.rename`` of a non-empty folder fails on any existing
    non-empty ``dst``)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def _install(new: Path, directory: Path, aside: Path, overwrite: bool) -> None:
    """Put the complete checkpoint ``new`` at ``directory``. Without ``overwrite``, refuse an
    existing ``directory`` atomically (``FileExistsError``). With it, swap them in one atomic
    exchange (``new`` then holds the old checkpoint), or, where there is none, rename the old one
    to ``aside`` and ``new`` in, renaming the old one back if that fails."""
    if not overwrite or not os.path.lexists(directory):
        try:
            return _rename_noreplace(new, directory)
        except FileExistsError:
            if not overwrite:
                raise
    if _renameat2(new, directory, _RENAME_EXCHANGE):
        return
    os.rename(directory, aside)
    try:
        _rename_noreplace(new, directory)
    except BaseException:
        os.rename(aside, directory)
        raise


def _remove(path: Path) -> bool:
    """Delete ``path`` (a folder); whether it is gone."""
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


# --------------------------------------------------------------------------------------------
# One checkpoint directory: save, recover, restore


def _siblings(directory: Path, marker: str) -> list[Path]:
    """The leftovers ``.<name><marker>*`` beside ``directory``, oldest first."""
    prefix = f".{directory.name}{marker}"

    def mtime(p: Path) -> int:
        try:
            return p.stat().st_mtime_ns
        except OSError:
            return 0
    try:
        found = [p for p in directory.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    return sorted(found, key=mtime)


def _complete(path: Path) -> bool:
    """A finished save: the orbax directory is in place (orbax renames it there last) and its
    meta item parses."""
    if not path.is_dir():
        return False
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
    """Finish or undo saves of ``directory`` whose process is provably gone (killed): each such
    temporary is first claimed (renamed to one of this process, so that two recovering processes
    never work on the same one); if ``directory`` is missing, the newest complete checkpoint in
    them (a new one before an old one set aside) is renamed into place; then they are deleted.

    Temporaries of a save still running (on this host: its pid lives with the same start time)
    are never touched, so readers and other writers cannot disturb it. Those of another host or
    container, or of an older jpeft that did not record its owner, are left too, with a
    :class:`CheckpointWarning` saying what to do. Returns whether anything was recovered or
    removed. Called by every function here that touches a checkpoint path."""
    directory = Path(directory).absolute()
    prefix = f".{directory.name}{_TMP}"
    gone = []
    for temp in _siblings(directory, _TMP) + _siblings(directory, _LEGACY_OLD):
        state = _owner_state(temp, prefix) if temp.name.startswith(prefix) else "unknown"
        if state == "gone":
            gone.append(temp)
        elif state != "running":
            warnings.warn(_left_alone_message(temp, directory, state), CheckpointWarning,
                          stacklevel=3)
    claimed = []
    for temp in gone:
        mine = directory.parent / f"{prefix}{_owner_token()}"
        with contextlib.suppress(OSError):       # another process claimed it first
            os.rename(temp, mine)
            claimed.append(mine)
    if claimed and not os.path.lexists(directory):
        for candidate in [t / name for t in claimed[::-1] for name in (_CKPT, _ASIDE)]:
            if _complete(candidate):
                with contextlib.suppress(OSError):
                    _rename_noreplace(candidate, directory)
                    _fsync_dir(directory.parent)
                    break
    for temp in claimed:
        _remove(temp)
    return bool(claimed)


def _cause(e: BaseException) -> str:
    """A one-line description of ``e`` for a message: an OS error as its text and code (also when
    tensorstore reports one), else its type and text without the debris of the C++ libraries
    (file and key prefixes, source locations, pybind11's bound methods)."""
    code = e.errno if isinstance(e, OSError) else None
    found = re.search(r"os_error_code='?(\d+)", str(e))
    code = int(found[1]) if code is None and found else code
    if code in errno.errorcode:
        return f"{os.strerror(code)} ({errno.errorcode[code]})"
    return _clean(_tensorstore_cause(str(e))) or type(e).__name__


def _tensorstore_cause(text: str) -> str:
    """``"CODE: Error reading "k" in ... file "f": detail"`` -> ``"CODE: detail"``."""
    text = " ".join(text.split())
    code, rest = re.match(r"([A-Z_]+: )?", text)[0], text.rsplit('": ', 1)[-1]
    return code + rest if not rest.startswith(code) else rest


def _clean(text: str) -> str:
    text = re.sub(r"<bound method [^>]*>|<built-in method [^>]*>|\[source locations=[^\]]*\]"
                  r"|\[tensorstore_spec=[^\]]*\]|\[os_error_code=[^\]]*\]|pybind11\S*", "", text)
    return " ".join(text.split())[:300].strip(" :;,")


def _save_failed(directory: Path, e: BaseException, temp: Path, existed: bool) -> str:
    if (temp / _ASIDE).exists():            # an overwrite whose undo failed
        state = (f"the previous checkpoint is at {temp / _ASIDE}: move it back to {directory} "
                 f"(the next access after this process ends does so)")
    else:
        left = ("nothing was left behind" if not os.path.lexists(temp) else
                f"its temporary {temp} could not be removed: delete it by hand")
        state = left + (f"; the checkpoint already at {directory} is intact" if existed else "")
    return f"saving {directory} failed: {_cause(e)}; {state}"


def save(directory: str | os.PathLike, delta: Any, *, opt_state: Any = None, data: Any = None,
         step: int | None = None, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``delta`` (and optionally ``opt_state`` and ``step``) to ``directory``, atomically.

    The checkpoint is written complete under this process's temporary, then put in place: a new
    one by a rename that refuses an existing ``directory`` (so of two racing saves without
    ``overwrite`` exactly one succeeds); an overwrite by an atomic exchange (or, where the file
    system has none, by renaming the old one aside and back on failure). A failed save removes
    everything it created and leaves the old checkpoint as it was.

    Args:
      directory: target directory; must not exist unless ``overwrite``.
      delta: the delta tree.
      opt_state: optimizer state, to resume training exactly.
      data: arrays that define the method (``method.data``: FAR's columns, sparse indices),
        stored as the item ``data``; :func:`jpeft.save` passes them.
      step: training step.
      metadata: JSON-serialisable extra information (e.g. the task, the data version).
      overwrite: replace an existing checkpoint (the old one stays until the new one is complete).

    Raises:
      FileExistsError: ``directory`` exists (or another save put it there first) and
        ``overwrite`` is false.
      CheckpointError: the write failed (full disk, file too large, any I/O error); the message
        names the cause and what was left (nothing; the old checkpoint intact).
    """
    directory = Path(directory).absolute()
    recover(directory)
    if os.path.lexists(directory) and not overwrite:
        raise FileExistsError(_exists_message(directory))
    trees = _trees(delta, opt_state=opt_state, data=data)
    meta = _meta(trees, step, metadata)
    existed = os.path.lexists(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        temp = _new_temporary(directory)
    except OSError as e:
        raise CheckpointError(f"saving {directory} failed: {_cause(e)}; nothing was written")
    try:
        with _quiet(), ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(temp / _CKPT, args=_items_args(trees, meta))
        _fsync_dir(temp)
        _install(temp / _CKPT, directory, temp / _ASIDE, overwrite)
    except BaseException as e:
        if not (temp / _ASIDE).exists():
            _remove(temp)
        if isinstance(e, FileExistsError) and not overwrite:
            raise FileExistsError(_exists_message(directory, raced=True)) from None
        if not isinstance(e, Exception):
            raise
        raise CheckpointError(_save_failed(directory, e, temp, existed)) from None
    _remove(temp)                          # the old checkpoint, after an overwrite
    _fsync_dir(directory.parent)
    return directory


def _exists_message(directory: Path, raced: bool = False) -> str:
    how = "another save wrote it first; " if raced else ""
    return f"{directory} exists; {how}pass overwrite=True to replace it"


def _checked_dir(directory: str | os.PathLike) -> Path:
    directory = Path(directory).absolute()
    recover(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no jpeft checkpoint at {directory}")
    return directory


def metadata(directory: str | os.PathLike) -> dict:
    """``{"step": ..., "metadata": ..., "method": ..., "holds": ...}`` as written by :func:`save`:
    ``method`` the method record (``None`` for a bare checkpoint, :func:`written_by`), ``holds``
    what the directory holds in words (:func:`holds`)."""
    meta = _read_meta(_checked_dir(directory))
    return {"step": meta["step"], "metadata": meta["metadata"], "method": written_by(meta),
            "holds": holds(meta)}


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


def restore(directory: str | os.PathLike, delta_like: Any, *, opt_state_like: Any = None,
            data_like: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` (or :func:`jpeft.save`), all or nothing.

    Args:
      directory: checkpoint directory.
      delta_like: a tree with the delta's structure, shapes and dtypes (arrays or
        ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape(method.init, key, params)``); shardings on it
        place the restored arrays.
      opt_state_like: likewise for the optimizer state, when it is wanted.
      data_like: likewise for the method's data (``stored_like(path, "data")``), when wanted.

    Returns:
      ``{"delta": ..., "step": ..., "metadata": ...}`` plus ``"opt_state"`` and ``"data"`` when
      asked for.

    Raises:
      FileNotFoundError: no checkpoint at ``directory``.
      CheckpointError (a ``ValueError``): a template of another method (naming the stored method
        and the template's); every missing, unexpected, mis-shaped or mis-typed entry (for a
        :func:`jpeft.save` directory, with the advice to read it with :func:`jpeft.load`); or
        damaged files (an unreadable item, an array whose bytes differ from those saved).
    """
    return _restore_dir(_checked_dir(directory), _trees(delta_like, opt_state=opt_state_like,
                                                        data=data_like))


def _restore_dir(directory: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """:func:`restore` of the items ``wanted`` (their templates) of one complete checkpoint
    directory (a save's, or a Manager step's)."""
    meta = _read_meta(directory)
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
        trees = _trees(delta, opt_state=opt_state)
        saved = bool(self._mngr.save(step, args=_items_args(trees, _meta(trees, step, metadata)),
                                     force=True))
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
        return _restore_dir(self.directory / str(step), _trees(delta_like,
                                                               opt_state=opt_state_like))

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> "Manager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
