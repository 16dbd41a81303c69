"""Marks: named activations of the forward pass where a method may change a value.

Contractions (:mod:`jpeft.core.sites`) are found from the data flow of the weights. The other
places the survey's methods act on are activations: a sublayer's input and output (bottleneck
and parallel adapters, UniPELT's gates), the keys, values and mask of an attention (prefix
tuning, IA3), the input embeddings (prompt tuning). A *mark* names such a value::

    x = marks.mark(x, scope, "out")          # identity; the value is now a site (scope, "out")

A mark is ``jax.ad_checkpoint.checkpoint_name`` with a name of the form ``"jpeft:<kind>:<scope>"``:
an identity primitive that every JAX transformation already passes through and that the compiler
removes, so a marked model runs exactly as before when no method edits the mark. (A model that
rematerialises with ``save_any_names_but_these`` would also save jpeft's marks; every other remat
policy ignores them.) Names that a model already gives its activations with ``checkpoint_name``
(e.g. ``"query_proj"``) are sites too, of kind ``"named"``.

Marks are placed three ways, all realised by the data-flow backend (:mod:`jpeft.core.dataflow`),
which finds them in the traced program and applies :class:`jpeft.core.sites.MarkEdit` s there:

* jpeft's own models call :func:`mark` at named hook points (see :data:`KINDS`);
* every Flax linen module call is marked automatically while jpeft traces a model
  (:func:`framework_marks`): its first positional argument as ``"in"`` and its output (the first
  element of a tuple output) as ``"out"``, scoped by the module's path
  (``flax.linen.intercept_methods``, nothing patched);
* every Flax NNX module called inside :func:`jpeft.nnx.split`'s ``apply`` likewise.

A site is keyed by ``(scope, kind)``; ``scope`` is a path tuple of strings (the module path).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpeft.core import paths as paths_lib

Path = paths_lib.Path
Key = tuple  # (scope: Path, kind: str)

PREFIX = "jpeft:"

#: The kinds of marks jpeft's own models place, and what each value is.
KINDS = {
    "in": "a module's (sublayer's) first input, [..., features]",
    "out": "a module's (sublayer's) output, [..., features]",
    "embeddings": "the input embeddings the encoder or decoder stack receives, [B, T, D]",
    "positions": "the tokens' position ids (int), [1, T] or [B, T]",
    "query": "attention queries after projection and head split, [B, T, H, Dh]",
    "keys": "attention keys after projection and head split (and rotary), [B, S, Hkv, Dh]",
    "values": "attention values after projection and head split, [B, S, Hkv, Dh]",
    "mask": "the attention mask: bool (True attends) or an additive bias (0 attends, very "
            "negative masks), broadcastable to [B, H, T, S]",
    "scores": "attention scores, scaled and masked, before the softmax, float32, [B, H, T, S] "
              "(only where the model forms them: a fused attention has none)",
    "lse": "read-only: log-sum-exp over the keys of the attention's masked scaled scores, "
           "float32, [B, T, H] (the log of the softmax's normaliser)",
    "context": "attention output per head before the output projection, [B, T, H, Dh]",
    "hidden": "the feed-forward hidden activation after the non-linearity, [B, T, F]",
    "named": "a value the model names itself with jax.ad_checkpoint.checkpoint_name",
}


#: Kinds whose value the model computes for methods to read and does not use itself: an edit
#: there would change nothing, so the backend refuses one.
READ_ONLY = frozenset({"lse"})


def scope_of(where: Any) -> Path:
    """The scope path of ``where``: a path tuple or ``"a/b"`` string as given, a bound Flax linen
    module's ``path``, or an NNX module's path in the model given to :func:`jpeft.nnx.split`
    (the ``_jpeft_scope`` of the class its ``apply`` builds the module as; ``()`` for a module
    running outside it)."""
    if isinstance(where, str):
        return tuple(s for s in where.split("/") if s)
    if isinstance(where, tuple):
        return tuple(str(s) for s in where)
    scope = getattr(where, "_jpeft_scope", None)
    if scope is not None:
        return scope
    path = getattr(where, "path", None)          # flax.linen.Module.path (bound modules)
    if isinstance(path, tuple):
        return tuple(str(s) for s in path)
    return ()


def mark(x: jax.Array, where: Any, kind: str) -> jax.Array:
    """``x`` unchanged, marked as the site ``(scope_of(where), kind)``."""
    if ":" in kind:
        raise ValueError(f"mark: a kind may not contain ':', got {kind!r}")
    return checkpoint_name(x, f"{PREFIX}{kind}:{'/'.join(scope_of(where))}")


def parse(name: str) -> Key:
    """``(scope, kind)`` of a ``checkpoint_name`` name (foreign names: ``((name,), "named")``)."""
    if name.startswith(PREFIX):
        kind, _, scope = name[len(PREFIX):].partition(":")
        return tuple(s for s in scope.split("/") if s), kind
    return (name,), "named"


def key_str(key: Key) -> str:
    """``"scope/path:kind"``, the printed and JSON form of a mark key."""
    return f"{'/'.join(key[0])}:{key[1]}"


def key_from_str(s: str) -> Key:
    scope, _, kind = s.rpartition(":")
    return tuple(p for p in scope.split("/") if p), kind


def _markable(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact)


def _mark_call(next_fun, args, kwargs, scope: Path):
    if args and _markable(args[0]):
        args = (mark(args[0], scope, "in"),) + tuple(args[1:])
    out = next_fun(*args, **kwargs)
    if _markable(out):
        return mark(out, scope, "out")
    if isinstance(out, tuple) and out and _markable(out[0]):     # (hidden, ...), scan (carry, y)
        first = mark(out[0], scope, "out")
        if hasattr(out, "_fields"):                              # a NamedTuple keeps its type
            return out._replace(**{out._fields[0]: first})
        if type(out) is tuple:
            return (first,) + out[1:]
    return out


def _linen_interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    return _mark_call(next_fun, args, kwargs, scope_of(context.module))


@contextlib.contextmanager
def framework_marks() -> Iterator[None]:
    """Within: every Flax linen module ``__call__`` marks its first input ``"in"`` and its output
    ``"out"`` (no effect on code that is not linen)."""
    try:
        import flax.linen as nn
    except ImportError:            # pragma: no cover - flax is a dependency
        yield
        return
    with nn.intercept_methods(_linen_interceptor):
        yield


_MARKED_CLASSES: dict[tuple[type, Path], type] = {}


def _marked_class(cls: type, scope: Path) -> type:
    """The NNX module class that :func:`jpeft.nnx.split` builds the sub-module at ``scope`` as.

    A subclass of ``cls`` (same name, module and qualified name, so ``isinstance`` checks and
    reprs are unchanged) with the class attribute ``_jpeft_scope = scope`` (read by
    :func:`scope_of`) and, when ``cls`` defines ``__call__``, a ``__call__`` that marks the
    call's first input ``"in"`` and its output ``"out"`` at ``scope`` around ``cls.__call__``.
    One class per ``(cls, scope)``, created once and cached; instances are only ever made by
    ``nnx.merge`` from the graph definition :func:`jpeft.nnx.split` rewrites, never by changing
    the class of an existing object. ``cls`` may already be such a class (its base is used).
    """
    cls = getattr(cls, "_jpeft_base", cls)
    key = (cls, scope)
    if key not in _MARKED_CLASSES:
        body: dict[str, Any] = {"_jpeft_scope": scope, "_jpeft_base": cls,
                                "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                "__doc__": cls.__doc__}
        if any("__call__" in vars(k) for k in cls.__mro__ if k is not object):
            def __call__(self, *args, **kwargs):
                return _mark_call(lambda *a, **k: cls.__call__(self, *a, **k), args, kwargs,
                                  scope)
            body["__call__"] = __call__
        # flax registers every Module subclass as a graph node type; ``pytree`` (whether the
        # instances are JAX pytrees) is passed on, since a subclass would otherwise take
        # flax's default rather than its base's setting.
        kwds = {"pytree": cls._pytree__is_pytree} if hasattr(cls, "_pytree__is_pytree") else {}
        _MARKED_CLASSES[key] = types.new_class(cls.__name__, (cls,), kwds,
                                               lambda ns: ns.update(body))
    return _MARKED_CLASSES[key]
