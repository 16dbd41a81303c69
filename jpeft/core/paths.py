"""Key paths and target selection over arbitrary pytrees.

Every leaf of a parameter tree has a *path*: the tuple of its keys as strings, e.g.
``("params", "encoder", "layer", "0", "attention", "self", "query", "kernel")``. The path without its
last element is the leaf's *module path*. Methods choose which leaves they adapt with a
:class:`Selection` (targets, layers, exclusions) matched against module paths, so the same call works
for any model written in any JAX library: nothing here knows about a particular architecture.

Target forms (as in Hugging Face PEFT's ``target_modules``):

* a ``str``: a regular expression that must *fully* match the module path, written with ``/`` or ``.``
    between components (``r".*attention/self/(query|value)"`` or ``r".*attention\\.self\\.query"``),
    in RE2 syntax (:func:`fullmatch`: linear time in the path's length whatever the pattern, so a
    pattern read from a file cannot hang the process; no backreferences or lookaround);
* a sequence of ``str``: suffixes of the module path, component-wise (``"query"`` matches
    ``.../self/query``; ``"self/query"`` or ``"self.query"`` matches the last two components);
* ``None``: every candidate leaf.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax

Path = tuple[str, ...]
Targets = str | Sequence[str] | None


def key_to_str(key: Any) -> str:
    """One ``jax.tree_util`` key entry (dict key, attribute, sequence index) as a string."""
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def to_path(keypath: Iterable[Any]) -> Path:
    """A ``jax.tree_util`` key path as a tuple of strings."""
    return tuple(key_to_str(k) for k in keypath)


def path_str(path: Path, sep: str = "/") -> str:
    return sep.join(path)


def is_array_node(x: Any) -> bool:
    """Whether ``x`` is a pytree node that stands for one array (a quantized weight,
    :class:`jpeft.ops.quantize.QuantizedArray`: its class sets ``__jpeft_array__``). Selection,
    reports and parameter maps treat it as one leaf at its own path."""
    return bool(getattr(type(x), "__jpeft_array__", False))


def flatten(tree: Any) -> dict[Path, Any]:
    """``{path: leaf}`` for every leaf of ``tree``, in tree order (an array node such as a
    quantized weight is one leaf)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_array_node)
    return {to_path(kp): leaf for kp, leaf in leaves}


def unflatten(flat: dict[Path, Any]) -> dict:
    """Nested dicts from ``{path: value}`` (the inverse of :func:`flatten` for dict trees)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def get_path(tree: dict, path: Path) -> Any:
    node = tree
    for k in path:
        node = node[k]
    return node


_LAYER_RE = re.compile(r"^(?:(.*?)[_.-]?)?(\d+)$")


def layer_index(path: Path, layers_pattern: str | None = None) -> int | None:
    """Index of the layer a path belongs to, or ``None``.

    The first path component that is an integer (``"3"``, as in Hugging Face naming
    ``layer/3``) or ends in ``_<int>`` (``"layers_3"``, Flax's list naming) gives the index. With
    ``layers_pattern`` only a component right after one named ``layers_pattern`` (or one spelled
    ``<layers_pattern>_<int>``) counts.
    """
    for i, comp in enumerate(path):
        m = _LAYER_RE.match(comp)
        if not m:
            continue
        prefix, idx = m.group(1), int(m.group(2))
        if layers_pattern is None:
            return idx
        if prefix == layers_pattern or (not prefix and i > 0 and path[i - 1] == layers_pattern):
            return idx
    return None


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str):
    """``pattern`` compiled by RE2 (``google-re2``), which matches in time linear in the text
    whatever the pattern (Python's ``re`` backtracks: ``"(.*.*)*Z"`` takes minutes on a long
    module path). Cached.

    Raises:
      ValueError: a pattern RE2 cannot compile (a backreference such as ``\\1``, lookaround such
        as ``(?=...)``, a syntax error), naming it.
    """
    import re2
    options = re2.Options()
    options.log_errors = False
    try:
        return re2.compile(pattern, options)
    except re2.error as e:
        why = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"the pattern {pattern!r} is not RE2 syntax ({why}): jpeft matches "
                         f"regular expressions with RE2 (linear time), which has no "
                         f"backreferences or lookaround; rewrite it in RE2 syntax, or give the "
                         f"module names as a list of suffixes") from None


def fullmatch(pattern: str, text: str) -> bool:
    """Whether the regular expression ``pattern`` matches all of ``text`` (``re.fullmatch``
    semantics, RE2 syntax: :func:`compile_pattern`).

    Raises:
      ValueError: a pattern RE2 cannot compile.
    """
    return compile_pattern(pattern).fullmatch(text) is not None


def _as_components(s: str) -> Path:
    return tuple(c for c in re.split(r"[/.]", s) if c)


def matches(module_path: Path, targets: Targets) -> bool:
    """Whether a module path is selected by ``targets`` (see module docstring).

    Raises:
      ValueError: a regular expression RE2 cannot compile (:func:`compile_pattern`).
    """
    if targets is None:
        return True
    if isinstance(targets, str):
        return (fullmatch(targets, path_str(module_path, "/"))
                or fullmatch(targets, path_str(module_path, ".")))
    for t in targets:
        comps = _as_components(t)
        if comps and module_path[-len(comps):] == comps:
            return True
    return False


class Selection(NamedTuple):
    """Which leaves a method adapts.

    Attributes:
        targets: module-path targets (regex string, list of suffixes, or ``None`` for all).
        leaf_names: names of the leaves considered (e.g. ``("kernel",)``); ``None`` for any name.
        layers_to_transform: layer indices to keep (an int or a sequence), ``None`` for all.
        layers_pattern: name of the component that holds layer indices (see :func:`layer_index`).
        exclude: module paths to drop, in the same forms as ``targets``.
        ndim: required number of dimensions of the leaf, or ``None``.
    """
    targets: Targets = None
    leaf_names: Sequence[str] | None = None
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | None = None
    exclude: Targets = ()
    ndim: int | None = None


def _candidates(flat: dict[Path, Any], sel: Selection) -> list[Path]:
    out = []
    for path, leaf in flat.items():
        if sel.leaf_names is not None and path[-1] not in sel.leaf_names:
            continue
        if sel.ndim is not None and getattr(leaf, "ndim", None) != sel.ndim:
            continue
        out.append(path)
    return out


def select(tree: Any, sel: Selection, *, what: str = "selection") -> list[Path]:
    """Paths of the leaves of ``tree`` chosen by ``sel``, in tree order.

    Raises:
        ValueError: when nothing is selected. The message lists the closest existing module paths, so a
            misspelt target is never a silent no-op.
    """
    flat = flatten(tree)
    cands = _candidates(flat, sel)
    if not cands:
        names = sorted({p[-1] for p in flat})
        raise ValueError(
                f"{what}: the tree has no leaf with name in {tuple(sel.leaf_names or ())}"
                f"{f' and ndim {sel.ndim}' if sel.ndim else ''}; leaf names present: {names}")
    layers = sel.layers_to_transform
    if isinstance(layers, int):
        layers = (layers,)
    chosen = []
    for path in cands:
        module = path[:-1]
        if not matches(module, sel.targets):
            continue
        if sel.exclude and matches(module, sel.exclude):
            continue
        if layers is not None and layer_index(module, sel.layers_pattern) not in layers:
            continue
        chosen.append(path)
    if not chosen:
        modules = sorted({path_str(p[:-1]) for p in cands})
        wanted = sel.targets if isinstance(sel.targets, str) else list(sel.targets or ["<all>"])
        probes = [wanted] if isinstance(wanted, str) else wanted
        close: list[str] = []
        for t in probes:
            close += [m for m in difflib.get_close_matches(str(t), modules, n=5, cutoff=0.0)
                                if m not in close]
        suffix_hits = [m for m in modules
                   if any(m.endswith(str(t).split("/")[-1]) for t in probes)][:5]
        for m in suffix_hits:
            if m not in close:
                close.insert(0, m)
        extra = ""
        if layers is not None:
            found = sorted({i for p in cands if (i := layer_index(p[:-1], sel.layers_pattern)) is not None})
            extra = f" with layers_to_transform={list(layers)} (layer indices present: {found})"
        if sel.exclude:
            extra += f" after exclude={sel.exclude!r}"
        raise ValueError(
                f"{what}: targets {wanted!r}{extra} matched none of the {len(modules)} candidate modules "
                f"(leaves named {tuple(sel.leaf_names or ('*',))}). Closest existing paths: {close[:8]}")
    return chosen


def map_selected(fn: Callable[[Path, Any, Any], Any], tree: Any, flat_delta: dict[Path, Any]) -> Any:
    """``tree`` with ``fn(path, leaf, delta_entry)`` applied at every path present in ``flat_delta``.

    Raises:
      ValueError: a selected leaf is quantized (an array node): changing it in place would
        dequantize it silently."""
    def visit(kp, leaf):
        path = to_path(kp)
        if path in flat_delta:
            if is_array_node(leaf):
                raise ValueError(
                    f"{path_str(path)} is a quantized weight ({leaf!r}): it cannot take a change "
                    f"in place. Merge into the dequantized base (jpeft.dequantize_params(params) "
                    f"first: a full-precision model), or keep the adapter unmerged")
            return fn(path, leaf, flat_delta[path])
        return leaf
    return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_array_node)
