"""The one interface every PEFT method implements, and the functions that use it.

A method is a :class:`Method`: a named tuple of pure functions, in the spirit of
``optax.GradientTransformation``::

    method = jpeft.lora(targets=("query", "value"), rank=8, alpha=8)
    delta  = method.init(key, params)             # small trainable tree; params untouched
    f      = jpeft.wrap(model.apply, method)      # f(params, delta, *args) -> outputs
    merged = method.merge(params, delta)          # zero-overhead inference where the math allows

``params`` is whatever the apply function takes as its first argument (for linen, the variables
dict ``{"params": ...}``). ``delta`` is a pytree that holds only trainable arrays; it mirrors the
paths of the base weights it adapts, so the shardings of those weights carry over to it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax

from jpeft.core import paths as paths_lib

Params = Any
Delta = Any
Interceptor = Callable[..., Any]


class Context(NamedTuple):
    """How a forward pass sees the delta.

    Attributes:
      mode: ``"factored"`` (methods that have a cheaper unmerged computation use it; e.g. LoRA
        computes ``x @ W0 + s * (x @ A) @ B`` and never forms ``dW0``) or ``"materialised"`` (every
        method is folded into the parameters first: ``apply(merge(params, delta))``).
      rng: key for delta-side randomness (LoRA dropout); ``None`` means deterministic (evaluation).
    """
    mode: str = "factored"
    rng: jax.Array | None = None


class Method(NamedTuple):
    """A parameter-efficient fine-tuning method as pure functions over pytrees.

    Attributes:
      name: short name; the default optimizer label of the delta's leaves.
      init: ``(key, params) -> delta``. Zero-effect at initialisation where the paper says so.
      merge: ``(params, delta) -> params`` with the delta folded into the base weights (exact math).
      unmerge: ``(params, delta) -> params``, the inverse of ``merge``; ``None`` when not invertible.
      prepare: ``(params, delta, context) -> (params, interceptors)``: the parameters the forward pass
        runs with and the linen interceptors that change its computation.
      shardings: ``(param_shardings, delta) -> delta_shardings``: ``param_shardings`` is a tree like
        ``params`` with a ``jax.sharding.Sharding`` per leaf; ``delta`` may be abstract.
      labels: ``delta -> tree of str`` for ``optax.partition``.
      config: JSON-serialisable description of the hyper-parameters (saved with checkpoints).
    """
    name: str
    init: Callable[[jax.Array, Params], Delta]
    merge: Callable[[Params, Delta], Params]
    unmerge: Callable[[Params, Delta], Params] | None
    prepare: Callable[[Params, Delta, Context], tuple[Params, tuple[Interceptor, ...]]]
    shardings: Callable[[Any, Delta], Any]
    labels: Callable[[Delta], Any]
    config: dict


def merge_only_prepare(merge: Callable[[Params, Delta], Params]):
    """``prepare`` for methods whose forward pass is just the merged parameters."""
    def prepare(params, delta, context):
        del context
        return merge(params, delta), ()
    return prepare


def constant_labels(name: str) -> Callable[[Delta], Any]:
    return lambda delta: jax.tree_util.tree_map(lambda _: name, delta)


def wrap(apply_fn: Callable[..., Any], method: Method, *, mode: str = "factored") -> Callable[..., Any]:
    """An apply function that takes the delta: ``f(params, delta, *args, delta_rng=None, **kwargs)``.

    ``apply_fn(params, *args, **kwargs)`` is the model's own (for linen, ``model.apply``). The result is
    pure and jit-safe. ``delta_rng`` switches on the method's own randomness (LoRA dropout) for
    training; leave it ``None`` in evaluation. ``mode`` is described in :class:`Context`.
    """
    if mode not in ("factored", "materialised"):
        raise ValueError(f"mode must be 'factored' or 'materialised', got {mode!r}")

    def wrapped(params, delta, *args, delta_rng=None, **kwargs):
        run_params, interceptors = method.prepare(params, delta, Context(mode, delta_rng))
        with contextlib.ExitStack() as stack:
            for ic in interceptors:
                stack.enter_context(nn.intercept_methods(ic))
            out = apply_fn(run_params, *args, **kwargs)
        for ic in interceptors:
            check = getattr(ic, "check_reached", None)
            if check is not None:
                check()
        return out

    return wrapped


def _covered(params_paths: set, delta: Any) -> set:
    """Base leaves a delta adapts: for each delta leaf, the longest prefix of its path that is a
    base leaf path (``.../kernel/lora_A`` and ``.../kernel/w`` cover ``.../kernel``)."""
    out = set()
    for path in paths_lib.flatten(delta):
        for n in range(len(path), 0, -1):
            if path[:n] in params_paths:
                out.add(path[:n])
                break
    return out


def _check_disjoint(params: Any, parts: dict) -> None:
    """Raise if two parts of a composed delta adapt the same base leaf (e.g. BitFit's classifier
    bias and a trained head: one weight trained twice, with two optimizer states)."""
    base = set(paths_lib.flatten(params))
    owner: dict = {}
    for name, delta in parts.items():
        for path in sorted(_covered(base, delta)):
            if path in owner:
                raise ValueError(
                    f"compose: parts {owner[path]!r} and {name!r} both adapt "
                    f"{paths_lib.path_str(path)}; narrow one of them (e.g. exclude=...)")
            owner[path] = name


def compose(**methods: Method) -> Method:
    """Several methods applied together, in the order given; the delta is ``{name: delta_i}``.

    ``jpeft.compose(lora=jpeft.lora(...), bitfit=jpeft.bitfit())`` trains both deltas; each part is
    labelled by its name for ``optax.partition``, so each can get its own optimizer.
    """
    if not methods:
        raise ValueError("compose needs at least one method")
    names = tuple(methods)

    def init(key, params):
        keys = jax.random.split(key, len(names))
        delta = {n: methods[n].init(k, params) for n, k in zip(names, keys)}
        _check_disjoint(params, delta)
        return delta

    def merge(params, delta):
        for n in names:
            params = methods[n].merge(params, delta[n])
        return params

    unmergeable = [n for n in names if methods[n].unmerge is None]

    def unmerge(params, delta):
        for n in reversed(names):
            params = methods[n].unmerge(params, delta[n])
        return params

    def prepare(params, delta, context):
        interceptors: tuple = ()
        for i, n in enumerate(names):
            rng = None if context.rng is None else jax.random.fold_in(context.rng, i)
            params, ics = methods[n].prepare(params, delta[n], context._replace(rng=rng))
            interceptors += tuple(ics)
        return params, interceptors

    def shardings(param_shardings, delta):
        return {n: methods[n].shardings(param_shardings, delta[n]) for n in names}

    def labels(delta):
        return {n: jax.tree_util.tree_map(lambda _, n=n: n, delta[n]) for n in names}

    return Method(
        name="+".join(names), init=init, merge=merge,
        unmerge=None if unmergeable else unmerge, prepare=prepare, shardings=shardings,
        labels=labels, config={"compose": {n: methods[n].config for n in names}})
