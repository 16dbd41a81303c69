"""Flax NNX models as pure functions of a parameter tree: the NNX side of :func:`jpeft.wrap`.

An NNX model is a graph of Python objects holding ``nnx.Variable`` s. :func:`split` turns it into
what every jpeft method works with: a plain nested dict of the parameter arrays (paths as the
model's attribute names: ``layers/0/attn/query/kernel``, or ``layers/attn/query/kernel`` with a
leading ``[L, ...]`` axis for layers stacked with ``nnx.vmap``/``nnx.scan``) and a pure
``apply(params, *args, **kwargs)`` that rebuilds the module from them and calls it::

    apply, params = jpeft.nnx.split(model)
    sites = jpeft.probe(apply, params, tokens)
    delta = method.init(key, params, sites)
    logits = jpeft.wrap(apply, method, sites)(params, delta, tokens)

Other state (``nnx.BatchStat``, RNG counters, caches) is kept as it was when split; ``apply``
does not mutate it. Inside ``apply`` every sub-module's call marks its first input and its output
as sites ``(module path, "in"/"out")`` (:mod:`jpeft.core.marks`), so methods that act on
sublayers (adapters) reach any NNX model; the marks are identities and cost nothing. For a method other than ``__call__`` pass ``method="generate"`` (any name of a
method of the module), or a callable ``(module, *args, **kwargs) -> out``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from jpeft.core import marks


def split(module: nnx.Module, *, filter: Any = nnx.Param,
          method: str | Callable[..., Any] = "__call__") -> tuple[Callable[..., Any], dict]:
    """``(apply, params)`` for an NNX module.

    Args:
      module: the model.
      filter: which variables are parameters (an ``nnx`` filter; default ``nnx.Param``).
      method: the method ``apply`` calls (name or ``(module, *args, **kwargs) -> out``).

    Returns:
      ``params``: nested dict of arrays (``nnx.to_pure_dict`` of the filtered state);
      ``apply(params, *args, **kwargs)``: the module rebuilt from ``params`` and called. Pure and
      jit-safe; the module itself is not changed.
    """
    graphdef, state, rest = nnx.split(module, filter, ...)
    params = nnx.to_pure_dict(state)

    def apply(p, *args, **kwargs):
        st = jax.tree_util.tree_map(lambda x: x, state)
        nnx.replace_by_pure_dict(st, p)
        m = nnx.merge(graphdef, st, rest)
        marks.mark_nnx_modules(m)         # sublayer sites: module inputs and outputs (a copy)
        if callable(method):
            return method(m, *args, **kwargs)
        return getattr(m, method)(*args, **kwargs)

    return apply, params
