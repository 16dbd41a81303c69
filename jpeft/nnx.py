"""Flax NNX models as pure functions of a parameter tree: the NNX side of :func:`jpeft.wrap`.

An NNX model is a graph of Python objects holding ``nnx.Variable`` s. :func:`split` turns it into
what every jpeft method works with: a plain nested dict of the parameter arrays (paths as the
model's attribute names: ``layers/0/attn/query/kernel``, or ``layers/attn/query/kernel`` with a
leading ``[L, ...]`` axis for layers stacked with ``nnx.vmap``/``nnx.scan``) and a pure
``apply(params, *args, **kwargs)`` that builds a fresh module from them and calls it::

    apply, params = jpeft.nnx.split(model)
    sites = jpeft.probe(apply, params, tokens)
    delta = method.init(key, params, sites)
    logits = jpeft.wrap(apply, method, sites)(params, delta, tokens)

**Other state.** Every variable that is not a parameter (``nnx.BatchStat``, the keys and counts of
stored ``nnx.Rngs``, ``nnx.Cache``, any other ``nnx.Variable``) is the model's *state*. It goes
in and out of ``apply`` explicitly, as linen's ``mutable`` does::

    state = jpeft.nnx.state(model)                      # nested dict of arrays
    out, state = apply(params, x, state=state)          # BatchNorm train mode, Dropout, ...
    out, state = jax.jit(jpeft.wrap(apply, method, sites))(params, delta, x, state=state)

The returned state is what the module's own call would leave in its variables (running
averages moved, RNG counts advanced). Without ``state=``, ``apply`` runs on the state as it was
when split and returns the output alone; if the call would change that state, it raises,
naming the variables, instead of dropping the update. A model in evaluation mode
(``model.eval()`` before splitting: running averages, deterministic dropout) changes none.

**The user's module is never changed**: ``apply`` builds a new module (new ``Variable`` objects)
from the arrays it is given, under ``jit``, ``grad`` and jpeft's tracing alike.

**Marks.** Inside ``apply`` every sub-module's call marks its first input and its output as sites
``(module path, "in"/"out")`` (:mod:`jpeft.core.marks`), so methods that act on sublayers
(adapters) reach any NNX model; the marks are identities and cost nothing. They are built into
the graph definition once, at split time: each module node's class in the ``GraphDef`` is
replaced by a cached subclass for its path (:func:`jpeft.core.marks._marked_class`: same name,
``isinstance`` still true, ``__call__`` wrapped to mark), so ``nnx.merge`` *constructs* marking
modules, also when ``nnx.scan``/``nnx.vmap`` inside the model split and merge them again; no
existing object's class or attributes are changed. (Flax NNX has no documented hook around
module calls, the role ``flax.linen.intercept_methods`` plays for linen; the graph definition's
node types, which ``nnx.merge`` instantiates, are the one place a per-module behaviour can be
given without touching a live object.)

For a method other than ``__call__`` pass ``method="generate"`` (any name of a method of the
module), or a callable ``(module, *args, **kwargs) -> out``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jpeft.core import marks

Path = tuple  # a variable's path in the module graph: attribute names and list indices


def state(module: nnx.Module, *, filter: Any = nnx.Param) -> dict:
    """The non-parameter state of ``module``: ``nnx.to_pure_dict`` of every variable that
    ``filter`` (the one given to :func:`split`) does not select, e.g.
    ``{"bn": {"mean": [F], "var": [F]}, "dropout": {"rngs": {"count": [], "key": []}}}``
    (``{}`` for a model without such variables). Pass it to ``apply(..., state=...)``."""
    _, _, rest = nnx.split(module, filter, ..., graph=True)
    return nnx.to_pure_dict(rest)


def split(module: nnx.Module, *, filter: Any = nnx.Param,
          method: str | Callable[..., Any] = "__call__") -> tuple[Callable[..., Any], dict]:
    """``(apply, params)`` for an NNX module.

    Args:
      module: the model (not changed, now or by ``apply``).
      filter: which variables are parameters (an ``nnx`` filter; default ``nnx.Param``). The
        other variables are the state (:func:`state`).
      method: the method ``apply`` calls (name or ``(module, *args, **kwargs) -> out``).

    Returns:
      ``params``: nested dict of arrays (``nnx.to_pure_dict`` of the filtered state).
      ``apply(params, *args, state=None, **kwargs)``: a new module built from ``params`` and the
      state, then called. Without ``state`` it uses the state as it was at split time and
      returns the output; with ``state`` (a dict shaped like :func:`state`'s) it returns
      ``(output, new_state)``. Pure and jit-safe. (``state`` is ``apply``'s own keyword: a
      method with a parameter of that name is reached with ``method=`` renaming it.)

    ``apply`` raises ``ValueError`` (naming the variables) for ``params`` or ``state`` that lack
    or add variables; a call that changes the state when ``state`` was not given; a call that
    assigns parameters, or adds or removes variables. A variable counts as changed when the call
    leaves it holding another value: not the very array it was given, nor (eagerly) an equal one,
    nor (traced) the traced program's pass-through of its input, as ``nnx.jit``/``nnx.remat``
    inside a model write back unchanged variables (:func:`_passed_through`).
    """
    graphdef, param_state, rest = nnx.split(module, filter, ..., graph=True)
    graphdef = _marking_graphdef(module, graphdef)
    params = nnx.to_pure_dict(param_state)
    snapshot = nnx.to_pure_dict(rest)
    param_paths = [p for p, _ in nnx.to_flat_state(param_state)]
    state_paths = [p for p, _ in nnx.to_flat_state(rest)]
    clash = _takes_state(module, method)

    def build(values: Mapping[Path, Any]) -> nnx.Module:
        """A new (marking) module holding ``values`` (by variable path)."""
        return nnx.merge(graphdef, nnx.from_flat_state({p: values[p] for p in param_paths}),
                         nnx.from_flat_state({p: values[p] for p in state_paths}))

    def call(m: nnx.Module, args: tuple, kwargs: dict) -> Any:
        return method(m, *args, **kwargs) if callable(method) else \
            getattr(m, method)(*args, **kwargs)

    def apply(p, *args, state=None, **kwargs):
        given = state is not None
        if given and clash:
            raise ValueError(
                f"jpeft.nnx.split: {clash} has its own parameter 'state', which apply's state= "
                f"(the module's non-parameter variables) would take. Split with a method that "
                f"renames it, e.g. method=lambda m, *a, module_state, **k: m(*a, "
                f"state=module_state, **k).")
        if isinstance(state, nnx.State):
            state = nnx.to_pure_dict(state)
        m = build({**_at_paths(p, param_paths, "params"),
                   **_at_paths(snapshot if state is None else state, state_paths, "state")})
        before = _values(m)
        out = call(m, args, kwargs)
        after = _values(m)
        _check_structure(before, after)
        watched = param_paths if given else list(before)

        def rerun(values):
            m2 = build(values)
            call(m2, args, kwargs)
            return m2
        changed = _changed(before, after, watched, rerun)
        if changed:
            _raise_changes(changed, set(param_paths), _variables(m))
        if not given:
            return out
        return out, nnx.to_pure_dict(nnx.from_flat_state({q: after[q] for q in state_paths}))

    return apply, params


# --------------------------------------------------------------------------------------------
# Pieces


def _marking_graphdef(module: nnx.Module, graphdef: Any) -> Any:
    """``graphdef`` (of ``nnx.split(module, ...)``) with each module node's type replaced by its
    marking class for the node's path (:func:`jpeft.core.marks._marked_class`).

    A node is found by its index in the graph definition, which is the one ``nnx.graph.flatten``
    gives the node object (its ``ref_index``); its path is the first under which
    ``nnx.iter_graph`` meets it (a module shared by two parents takes one of their paths)."""
    ref_index = nnx.graph.RefMap()
    nnx.graph.flatten(module, ref_index=ref_index, graph=True)
    scopes = {}
    for path, node in nnx.iter_graph(module, graph=True):
        if isinstance(node, nnx.Module) and node in ref_index:
            scopes.setdefault(ref_index[node], tuple(str(k) for k in path))
    nodes = []
    for nd in graphdef.nodes:
        # A module node's metadata is its type (what ``nnx.merge`` instantiates); any other node
        # (variables, references, lists, a module that flattens itself otherwise) is kept.
        if (isinstance(nd, nnx.graph.NodeDef) and nd.index in scopes
                and nd.metadata is nd.type):
            cls = marks._marked_class(nd.type, scopes[nd.index])
            nd = type(nd)(type=cls, index=nd.index, outer_index=nd.outer_index,
                          num_attributes=nd.num_attributes, metadata=cls)
        nodes.append(nd)
    return type(graphdef)(nodes=nodes, attributes=graphdef.attributes,
                          num_leaves=graphdef.num_leaves)


def _takes_state(module: nnx.Module, method: str | Callable[..., Any]) -> str | None:
    """The name of ``method`` when it has its own parameter called ``state``, else ``None``."""
    fn = method if callable(method) else getattr(type(module), method, None)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if "state" in params and params["state"].kind is not inspect.Parameter.VAR_KEYWORD:
        return getattr(fn, "__qualname__", repr(fn))
    return None


def _at_paths(tree: Mapping, paths: list[Path], what: str) -> dict[Path, Any]:
    """``{path: leaf}`` of the nested dict ``tree`` at the variable ``paths`` (keys compared as
    strings, so a dict restored from a checkpoint, with ``"0"`` for ``0``, matches).

    Raises:
      ValueError: ``tree`` lacks some of ``paths`` or has leaves at others (both named).
    """
    want = {tuple(str(k) for k in p): p for p in paths}
    found: dict[tuple, Any] = {}

    def walk(node, prefix):
        if prefix in want or not isinstance(node, Mapping):
            found[prefix] = node
            return
        for k, v in node.items():
            walk(v, prefix + (str(k),))
    if not isinstance(tree, Mapping):
        raise ValueError(f"jpeft.nnx.split: apply's {what} must be a nested dict (as split or "
                         f"jpeft.nnx.state gives it), got {type(tree).__name__}")
    walk(tree, ())
    missing = [k for k in want if k not in found]
    extra = [k for k in found if k not in want]
    if missing or extra:
        show = lambda keys: ["/".join(k) for k in keys[:5]] + (["..."] if len(keys) > 5 else [])
        raise ValueError(
            f"jpeft.nnx.split: apply's {what} does not match the module's variables: "
            + "; ".join(s for s in (f"missing {show(missing)}" if missing else "",
                                    f"unexpected {show(extra)}" if extra else "") if s)
            + (". Pass the state as jpeft.nnx.state(model) gives it (with split's filter)."
               if what == "state" else ". Pass the params split returned (same paths)."))
    return {want[k]: found[k] for k in want}


def _variables(module: nnx.Module) -> dict[Path, nnx.Variable]:
    """Every variable of ``module`` by path."""
    return dict(nnx.to_flat_state(nnx.state(module, graph=True)))


def _values(module: nnx.Module) -> dict[Path, Any]:
    """Every variable's value (array, tracer, ...) by path."""
    return {p: v.get_raw_value() for p, v in _variables(module).items()}


def _name(path: Path) -> str:
    return "/".join(str(k) for k in path)


def _check_structure(before: Mapping[Path, Any], after: Mapping[Path, Any]) -> None:
    added = [_name(p) for p in after if p not in before]
    removed = [_name(p) for p in before if p not in after]
    if added or removed:
        raise ValueError(
            "jpeft.nnx.split: calling the module "
            + " and ".join(s for s in (f"added variables {added[:5]}" if added else "",
                                       f"removed variables {removed[:5]}" if removed else "")
                           if s)
            + "; apply keeps the module's variables fixed. Create them before splitting "
              "(e.g. a cache with init_cache), or collect sown values with nnx.capture inside "
              "method=.")


def _same(a: Any, b: Any) -> bool | None:
    """Whether ``a`` and ``b`` are the same value; ``None`` when that cannot be told without
    running the program (one is a tracer and they are different objects)."""
    if a is b:
        return True
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return None
    arrays = (jax.Array, np.ndarray, np.generic)
    if not (isinstance(a, arrays) and isinstance(b, arrays)):
        try:
            return bool(a == b)
        except Exception:                         # noqa: BLE001 - not comparable: a change
            return False
    if np.shape(a) != np.shape(b) or a.dtype != b.dtype:
        return False
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    return bool(jnp.array_equal(a, b, equal_nan=True))


def _changed(before: Mapping[Path, Any], after: Mapping[Path, Any], watched: list[Path],
             rerun: Callable[[Mapping[Path, Any]], nnx.Module]) -> list[Path]:
    """The ``watched`` variables whose value the call changed (``before``/``after``: the values
    by path around the call; ``rerun(values)``: the module built from ``values`` and called)."""
    same = {p: _same(before[p], after[p]) for p in watched}
    unknown = [p for p, s in same.items() if s is None]
    if unknown:
        kept = _passed_through(rerun, before, unknown)
        same.update({p: p in kept for p in unknown})
    return [p for p in watched if not same[p]]


def _passed_through(rerun: Callable[[Mapping[Path, Any]], nnx.Module],
                    before: Mapping[Path, Any], paths: list[Path]) -> set[Path]:
    """The variables among ``paths`` that the traced call leaves holding their input.

    The call is traced once more (``jax.make_jaxpr``, every array variable an input) and each
    variable's new value followed back through the program: a value that is an input, or the
    result of an equation with one sub-program (``jit``, ``remat``, custom-derivative and other
    call-like primitives: operands and results one to one) that returns its own operand
    unchanged, is that input. ``set()`` if the call cannot be traced again."""
    keys = [k for k, v in before.items() if isinstance(v, jax.Array)]

    def values_after(*xs):
        new = _values(rerun({**before, **dict(zip(keys, xs))}))
        return [new[p] for p in paths]
    try:
        closed = jax.make_jaxpr(values_after)(*(before[k] for k in keys))
    except Exception:                 # noqa: BLE001 - e.g. Python control flow on a value that
        return set()                  # was concrete: then they count as changed (an error)
    return {p for p, i in zip(paths, _forwarded(closed.jaxpr)) if i is not None and keys[i] == p}


def _forwarded(jaxpr: jcore.Jaxpr) -> list[int | None]:
    """For each output of ``jaxpr``, the index of the input it returns unchanged, else ``None``
    (through equations with one sub-program taking and returning operands and results one to
    one: ``jit``, ``remat``, custom-derivative calls; a ``scan``'s carry or ``xs`` likewise)."""
    src = {v: i for i, v in enumerate(jaxpr.invars)}
    for eqn in jaxpr.eqns:
        subs = [s for s in eqn.params.values() if isinstance(s, (jcore.Jaxpr, jcore.ClosedJaxpr))]
        if len(subs) != 1:
            continue
        inner = subs[0].jaxpr if isinstance(subs[0], jcore.ClosedJaxpr) else subs[0]
        if len(inner.invars) != len(eqn.invars) or len(inner.outvars) != len(eqn.outvars):
            continue
        for out, j in zip(eqn.outvars, _forwarded(inner)):
            x = None if j is None else eqn.invars[j]
            if x is not None and not isinstance(x, jcore.Literal) and x in src \
                    and x.aval == out.aval:
                src[out] = src[x]
    return [None if isinstance(v, jcore.Literal) else src.get(v) for v in jaxpr.outvars]


def _raise_changes(changed: list[Path], params: set[Path],
                   variables: Mapping[Path, nnx.Variable]) -> None:
    """Raise for the ``changed`` variables: assigned parameters, else the state (not given)."""
    assigned = [_name(p) for p in changed if p in params]
    if assigned:
        raise ValueError(
            f"jpeft.nnx.split: calling the module assigns the parameters {assigned[:5]}; apply "
            f"takes parameters as inputs and cannot return them. Keep such variables out of "
            f"split's filter (then they are state, returned with state=).")
    desc = [f"{_name(p)} ({type(variables[p]).__name__})" for p in changed]
    raise ValueError(
        f"jpeft.nnx.split: calling the module changes its non-parameter state: "
        f"{', '.join(desc[:8])}{', ...' if len(desc) > 8 else ''}. apply would drop these "
        f"updates. Pass the state in and take the new state back: "
        f"state = jpeft.nnx.state(model); out, state = apply(params, ..., state=state). Or "
        f"split the model in evaluation mode (model.eval(): BatchNorm uses its running "
        f"averages, Dropout is deterministic).")
