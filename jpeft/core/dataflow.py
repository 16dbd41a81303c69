"""The data-flow backend: contraction sites found and edited in the traced program itself.

``apply_fn(params, *args)`` is traced once to a jaxpr (``jax.make_jaxpr``) and evaluated again
equation by equation, inside whatever transformation the caller is under (``jit``, ``grad``,
``vmap``). Every parameter leaf enters as one input variable, so the evaluator knows, for every
value, whether it *is* a parameter leaf seen through layout-only operations (dtype casts, copies,
transposes; a ``scan`` slicing a stacked leaf): a :class:`View` of that leaf. When such a view
enters a ``dot_general`` or ``conv_general_dilated``:

* :func:`probe` records the layout of the contraction (:class:`jpeft.core.sites.Contraction`);
* :func:`call` computes the op as written and then applies the method's
  :class:`~jpeft.core.sites.ContractionEdit` for that leaf to the result.

Higher-order primitives are entered, not treated as opaque: nested ``jit`` calls are inlined,
``checkpoint``/``remat`` is re-applied around the evaluated body (same policy), ``scan``,
``cond`` and ``while`` are re-emitted with ``lax.scan``/``lax.switch``/``lax.while_loop`` around
the evaluated bodies, and custom-derivative functions that a parameter view reaches are
inlined (their primal computation; only then are their custom rules dropped). Under ``scan`` a
stacked weight ``[L, ...]`` arrives one slice per iteration; the edit's factors that share the
stacked axis are passed as extra scanned operands so each iteration sees its own slice, and an
iteration counter is passed along (``ContractionCall.index``). Equations that no parameter view
reaches are bound unchanged, so the compiled program is the model's own plus the edits.

Compared with monkey-patching ``jax.lax.dot_general`` (google/qwix's interception) this needs no
patching, keeps ``jit`` on, and identifies a weight by data flow, not by object identity or name.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jpeft.core import marks as marks_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib

Path = paths_lib.Path


class View(NamedTuple):
    """A value that is a parameter leaf seen through layout-only operations.

    ``axes[i]`` is the leaf's axis that axis ``i`` of the value is; ``sliced`` are the leaf's axes
    that enclosing ``scan`` loops have indexed away."""
    path: Path
    axes: tuple[int, ...]
    sliced: tuple[int, ...] = ()


class _Use(NamedTuple):
    kind: str
    stack: frozenset
    contract: frozenset
    free: frozenset
    scanned: tuple


class _State:
    """Per-call bookkeeping shared by every nesting level."""

    def __init__(self, edits: Mapping[Path, sites_lib.ContractionEdit] | None, record: bool,
                 rng: Any, marks: Mapping[tuple, sites_lib.MarkEdit] | None = None,
                 taps: frozenset = frozenset()):
        self.edits = dict(edits or {})
        self.taps = frozenset(taps)
        self.mark_edits = dict(marks or {})
        self.record = record
        self.rng = rng
        self.uses: dict[Path, list[_Use]] = {}
        self.other: dict[Path, set[str]] = {}
        self.reached: set[Path] = set()
        self.marks: dict[tuple, list] = {}           # key -> [(shape, dtype, scan lengths)]
        self.reached_marks: set[tuple] = set()
        self.tapped: dict = {}
        self._names: dict[int, frozenset] = {}

    def names_in(self, jaxpr) -> frozenset:
        """``checkpoint_name`` names inside ``jaxpr`` (nested ones included), as mark keys."""
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        if id(jaxpr) not in self._names:
            found = set()
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "name":
                    found.add(marks_lib.parse(eqn.params["name"]))
                for sub in _subjaxprs(eqn):
                    found |= self.names_in(sub)
            self._names[id(jaxpr)] = frozenset(found)
        return self._names[id(jaxpr)]

    def enters(self, eqn) -> bool:
        """Whether a higher-order equation no parameter view reaches must still be entered: it
        holds marks to record or to edit."""
        if eqn.primitive.name not in _HIGHER or not (self.record or self.mark_edits or self.taps):
            return False
        names = frozenset().union(*(self.names_in(j) for j in _subjaxprs(eqn)))
        return bool(names) and (self.record or any(k in self.mark_edits or k in self.taps
                                                   for k in names))

    def no_taps_in(self, eqn, what: str) -> None:
        inside = [k for j in _subjaxprs(eqn) for k in self.names_in(j) if k in self.taps]
        if inside:
            raise ValueError(f"observe: mark {marks_lib.key_str(inside[0])} is inside a {what}; "
                             f"its values cannot be returned from there")


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                yield x


class _Scope(NamedTuple):
    """Per-nesting-level context: the current (sliced) factors of each edit and arrays of each
    mark edit, the iteration indices and lengths of the enclosing scans, and the marks seen so far
    that this level can read (a fresh copy in every traced body, so no value leaks out)."""
    factors: Mapping[Path, Mapping[str, sites_lib.Factor]]
    index: tuple
    arrays: Mapping[tuple, Mapping[str, Any]] = {}
    lengths: tuple = ()
    seen: dict | None = None
    taps: dict | None = None

    def body(self, **changes) -> "_Scope":
        return self._replace(seen=dict(self.seen or {}), taps={}, **changes)


_LAYOUT_PRIMS = {"convert_element_type", "copy", "copy_p", "sharding_constraint",
                 "reduce_precision", "optimization_barrier"}


def _is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _trace(fn, params, args, kwargs):
    """``(closed_jaxpr, out_tree, dyn_values, n_param_leaves, param_paths)`` for ``fn``."""
    p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    param_paths = [paths_lib.to_path(kp) for kp, _ in p_leaves]
    for path, (_, leaf) in zip(param_paths, p_leaves):
        if not _is_dynamic(leaf):
            raise TypeError(f"params leaf {paths_lib.path_str(path)} is a {type(leaf).__name__}, "
                            f"not an array")
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dyn_pos = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
    dyn = [leaves[i] for i in dyn_pos]

    def flat_fn(*dyn_vals):
        full = list(leaves)
        for i, v in zip(dyn_pos, dyn_vals):
            full[i] = v
        p, a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(p, *a, **k)

    with marks_lib.framework_marks():
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dyn)
    out_tree = jax.tree_util.tree_structure(out_shape)
    return closed, out_tree, dyn, len(p_leaves), param_paths


def _read(env, v):
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _eval(jaxpr, consts, args, tags, state: _State, scope: _Scope):
    """Evaluate ``jaxpr`` on ``args`` (with :class:`View` tags or ``None``); returns
    ``(outputs, output tags)``."""
    env: dict = {}
    tagenv: dict = {}
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, t in zip(jaxpr.invars, args, tags):
        env[v] = x
        if t is not None:
            tagenv[v] = t
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        intags = [None if isinstance(v, jcore.Literal) else tagenv.get(v) for v in eqn.invars]
        if eqn.primitive.name == "name":
            outvals, outtags = _mark(eqn, invals, intags, state, scope)
        elif any(t is not None for t in intags) or state.enters(eqn):
            rule = _RULES.get(eqn.primitive.name, _other_use)
            outvals, outtags = rule(eqn, invals, intags, state, scope)
        else:
            outvals, outtags = _bind(eqn, invals), [None] * len(eqn.outvars)
        for v, x, t in zip(eqn.outvars, outvals, outtags):
            if isinstance(v, jcore.DropVar):
                continue
            env[v] = x
            if t is not None:
                tagenv[v] = t
    outs = [_read(env, v) for v in jaxpr.outvars]
    out_tags = [None if isinstance(v, jcore.Literal) else tagenv.get(v) for v in jaxpr.outvars]
    return outs, out_tags


# --------------------------------------------------------------------------------------------
# Rules for equations that a parameter view reaches


def _mark_other(state: _State, tags, what: str) -> None:
    """Record ``what`` as a non-contraction use of every tagged view in ``tags``."""
    for t in tags:
        if t is not None:
            state.other.setdefault(t.path, set()).add(what)


def _other_use(eqn, invals, intags, state, scope):
    _mark_other(state, intags, eqn.primitive.name)
    return _bind(eqn, invals), [None] * len(eqn.outvars)


def _passthrough(eqn, invals, intags, state, scope):
    outs = _bind(eqn, invals)
    if len(eqn.invars) == len(eqn.outvars):           # e.g. optimization_barrier: one to one
        return outs, list(intags)
    return outs, [intags[0]] + [None] * (len(outs) - 1)


def _transpose(eqn, invals, intags, state, scope):
    t = intags[0]
    perm = eqn.params["permutation"]
    return _bind(eqn, invals), [t._replace(axes=tuple(t.axes[p] for p in perm))]


def _inline_closed(closed, invals, intags, state, scope):
    return _eval(closed.jaxpr, closed.consts, invals, intags, state, scope)


def _jit(eqn, invals, intags, state, scope):
    return _inline_closed(eqn.params["jaxpr"], invals, intags, state, scope)


def _custom_jvp(eqn, invals, intags, state, scope):
    return _inline_closed(eqn.params["call_jaxpr"], invals, intags, state, scope)


def _custom_vjp(eqn, invals, intags, state, scope):
    closed = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
    return _inline_closed(closed, invals, intags, state, scope)


def _remat(eqn, invals, intags, state, scope):
    jaxpr = eqn.params["jaxpr"]

    def body(*xs):
        inner = scope.body()
        return _eval(jaxpr, (), xs, intags, state, inner)[0], inner.taps
    outs, taps = jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"],
                                policy=eqn.params["policy"])(*invals)
    if scope.taps is not None:
        scope.taps.update(taps)
    return list(outs), [None] * len(outs)


def _cond(eqn, invals, intags, state, scope):
    index, ops = invals[0], invals[1:]
    _mark_other(state, intags[:1], "cond (index)")
    state.no_taps_in(eqn, "cond")
    branches = [
        (lambda *xs, br=br: _eval(br.jaxpr, br.consts, xs, intags[1:], state, scope.body())[0])
        for br in eqn.params["branches"]]
    outs = jax.lax.switch(index, branches, *ops)
    return list(outs), [None] * len(outs)


def _while(eqn, invals, intags, state, scope):
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    ctags, btags, itags = intags[:cn], intags[cn:cn + bn], intags[cn + bn:]
    _mark_other(state, itags, "while (carry)")
    state.no_taps_in(eqn, "while loop")
    none = [None] * len(init)
    cond_fn = lambda c: _eval(p["cond_jaxpr"].jaxpr, p["cond_jaxpr"].consts,
                              [*cconsts, *c], [*ctags, *none], state, scope.body())[0][0]
    body_fn = lambda c: tuple(_eval(p["body_jaxpr"].jaxpr, p["body_jaxpr"].consts,
                                    [*bconsts, *c], [*btags, *none], state, scope.body())[0])
    outs = jax.lax.while_loop(cond_fn, body_fn, tuple(init))
    return list(outs), [None] * len(outs)


def _scan(eqn, invals, intags, state, scope):
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    ctags, itags, xtags = intags[:nc], intags[nc:nc + nk], intags[nc + nk:]
    _mark_other(state, itags, "scan (carry)")
    # Scanned views lose their leading axis; the factors of their edits follow.
    body_xtags, extra, extra_keys = [], [], []
    sliced_by_path: dict[Path, int] = {}
    for t in xtags:
        if t is None:
            body_xtags.append(None)
            continue
        k = t.axes[0]
        body_xtags.append(View(t.path, t.axes[1:], t.sliced + (k,)))
        sliced_by_path[t.path] = k
    for path, k in sliced_by_path.items():
        for name, f in scope.factors.get(path, {}).items():
            if k in f.axes:
                pos = f.axes.index(k)
                extra.append(jnp.moveaxis(f.value, pos, 0))
                extra_keys.append((path, name, pos))
    counter = jnp.arange(p["length"], dtype=jnp.int32)
    body_jaxpr = p["jaxpr"]
    # A scan over stacked weights is a layer scan: the arrays of the mark edits inside its body
    # get one slice of their leading axis per iteration. Other scans (a decoding loop) pass
    # them whole.
    layer_scan = bool(sliced_by_path)
    mark_keys = [k for k in state.names_in(body_jaxpr) if k in scope.arrays] if layer_scan else []
    mark_arrays = {k: dict(scope.arrays[k]) for k in mark_keys}
    for k, arrays in mark_arrays.items():
        for kp, a in jax.tree_util.tree_leaves_with_path(arrays):
            if np.ndim(a) < 1 or np.shape(a)[0] != p["length"]:
                raise ValueError(
                    f"mark {marks_lib.key_str(k)} is inside a scan of length {p['length']}: its "
                    f"edit's array {jax.tree_util.keystr(kp)} needs a leading axis of that "
                    f"length, got shape {np.shape(a)}")

    def body(carry, x):
        x_orig, x_extra, x_marks, i = x
        factors = {path: dict(fs) for path, fs in scope.factors.items()}
        for (path, name, pos), val in zip(extra_keys, x_extra):
            f = factors[path][name]
            factors[path][name] = sites_lib.Factor(val, f.axes[:pos] + f.axes[pos + 1:])
        inner = scope.body(factors=factors, index=scope.index + (i,),
                           arrays={**scope.arrays, **x_marks},
                           lengths=scope.lengths + ((p["length"],) if layer_scan else ()))
        outs, _ = _eval(body_jaxpr.jaxpr, body_jaxpr.consts, [*consts, *carry, *x_orig],
                        [*ctags, *([None] * nk), *body_xtags], state, inner)
        return outs[:nk], (outs[nk:], inner.taps)

    carry, (ys, taps) = jax.lax.scan(body, list(init), (list(xs), extra, mark_arrays, counter),
                                     length=p["length"],
                                     reverse=p["reverse"], unroll=p["unroll"])
    if scope.taps is not None:
        scope.taps.update(taps)               # one leading axis per iteration
    outs = list(carry) + list(ys)
    return outs, [None] * len(outs)


def _fold(rng, name: str, index: tuple):
    """``rng`` folded with a site's name and the enclosing scan indices (``None`` stays ``None``)."""
    if rng is None:
        return None
    rng = jax.random.fold_in(rng, zlib.crc32(name.encode()))
    for i in index:
        rng = jax.random.fold_in(rng, i)
    return rng


def _mark(eqn, invals, intags, state, scope):
    """A ``checkpoint_name``: record the mark, apply its edit, make it visible to later marks."""
    key = marks_lib.parse(eqn.params["name"])
    out = _bind(eqn, invals)[0]
    if key in state.taps and scope.taps is not None:
        scope.taps[key] = out                 # the value as it arrives, before this mark's edit
    if state.record:
        state.marks.setdefault(key, []).append(
            (tuple(np.shape(out)), str(out.dtype), scope.lengths))
    edit = state.mark_edits.get(key)
    if edit is not None:
        state.reached_marks.add(key)
        call = sites_lib.MarkCall(out, key[0], key[1], dict(scope.seen or {}), scope.index,
                                  _fold(state.rng, marks_lib.key_str(key), scope.index))
        new = edit.fn(call, scope.arrays.get(key, edit.arrays))
        if np.shape(new) != np.shape(out):
            raise ValueError(f"edit of mark {marks_lib.key_str(key)} returned shape "
                             f"{np.shape(new)} for a value of shape {np.shape(out)}")
        out = new.astype(out.dtype)
    if scope.seen is not None:
        scope.seen[key] = out
    return [out], list(intags)


def _dim_sets(view: View, contract, batch):
    """Weight axes (``frozenset``) contracted, batched and free for a view's op axes."""
    c = frozenset(view.axes[i] for i in contract)
    b = frozenset(view.axes[i] for i in batch)
    f = frozenset(a for i, a in enumerate(view.axes) if i not in contract and i not in batch)
    return c, b, f


def _record_and_edit(eqn, invals, intags, state, scope, kind, w_pos, x_pos, contract, batch):
    view = intags[w_pos]
    c, b, f = _dim_sets(view, contract, batch)
    state.uses.setdefault(view.path, []).append(
        _Use(kind, b | frozenset(view.sliced), c, f, tuple(view.sliced)))
    y = _bind(eqn, invals)[0]
    edit = state.edits.get(view.path)
    if edit is None:
        return [y], [None]
    state.reached.add(view.path)
    rng = _fold(state.rng, paths_lib.path_str(view.path), scope.index)
    call = sites_lib.ContractionCall(kind, invals[x_pos], y, view.axes, w_pos == 0,
                                     dict(eqn.params), scope.index, rng)
    out = edit.fn(call, scope.factors[view.path])
    if out.shape != y.shape:
        raise ValueError(f"edit of {paths_lib.path_str(view.path)} returned shape {out.shape} for "
                         f"an output of shape {y.shape}")
    return [out.astype(y.dtype)], [None]


def _dot_general(eqn, invals, intags, state, scope):
    lt, rt = intags
    if (lt is None) == (rt is None):                 # both operands are weights: not a site
        return _other_use(eqn, invals, intags, state, scope)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if rt is not None:
        return _record_and_edit(eqn, invals, intags, state, scope, "dot", 1, 0, rc, rb)
    return _record_and_edit(eqn, invals, intags, state, scope, "dot", 0, 1, lc, lb)


def _conv(eqn, invals, intags, state, scope):
    if intags[0] is not None or intags[1] is None:
        return _other_use(eqn, invals, intags, state, scope)
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec                    # (out feature, in feature, *spatial)
    contract = tuple(rhs_spec[1:])
    return _record_and_edit(eqn, invals, intags, state, scope, "conv", 1, 0, contract, ())


_HIGHER = {"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint", "custom_jvp_call",
           "custom_vjp_call", "custom_vjp_call_jaxpr", "cond", "while", "scan"}

_RULES: dict[str, Callable] = {
    "transpose": _transpose,
    "jit": _jit, "pjit": _jit, "closed_call": _jit, "core_call": _jit,
    "remat2": _remat, "checkpoint": _remat,
    "custom_jvp_call": _custom_jvp, "custom_vjp_call": _custom_vjp,
    "custom_vjp_call_jaxpr": _custom_vjp,
    "cond": _cond, "while": _while, "scan": _scan,
    "dot_general": _dot_general, "conv_general_dilated": _conv,
    **{name: _passthrough for name in _LAYOUT_PRIMS},
}


# --------------------------------------------------------------------------------------------
# Entry points


def _run(fn, params, args, kwargs, state: _State):
    closed, out_tree, dyn, n_params, param_paths = _trace(fn, params, args, kwargs)
    tags = [View(p, tuple(range(np.ndim(x)))) for p, x in zip(param_paths, dyn[:n_params])]
    tags += [None] * (len(dyn) - n_params)
    factors = {p: dict(e.factors) for p, e in state.edits.items()}
    arrays = {k: dict(e.arrays) for k, e in state.mark_edits.items()}
    top = _Scope(factors, (), arrays, (), {}, {})
    outs, _ = _eval(closed.jaxpr, closed.consts, dyn, tags, state, top)
    state.tapped = top.taps
    return jax.tree_util.tree_unflatten(out_tree, outs)


def call(fn: Callable[..., Any], params: Any, args: tuple, kwargs: dict, *,
         edits: Mapping[Path, sites_lib.ContractionEdit],
         marks: Mapping[tuple, sites_lib.MarkEdit] | None = None, rng: Any = None,
         what: str = "wrap", taps: Any = None) -> Any:
    """``fn(params, *args, **kwargs)`` with ``edits`` applied at the contractions of their
    weights and ``marks`` at the marked activations. With ``taps`` (mark keys), returns
    ``(output, {key: value})``: each tapped mark's value as it arrives there (edits upstream
    applied, its own not yet), stacked along a leading axis per enclosing ``scan`` (e.g. ``[L, ...]`` for a layer
    stack); a mark inside ``cond``/``while`` cannot be tapped.

    Raises:
      ValueError: an edited weight that the forward pass never contracts, or one that it also
        uses outside contractions (the edit would then change only part of its uses: the
        materialised form is the exact one there); an edited mark the pass never meets.
    """
    state = _State(edits, record=False, rng=rng, marks=marks, taps=frozenset(taps or ()))
    out = _run(fn, params, args, kwargs, state)
    if taps:
        missing = [k for k in taps if k not in state.tapped]
        if missing:
            raise ValueError(f"observe: marks {[marks_lib.key_str(k) for k in missing[:5]]} are "
                             f"never met in this forward pass")
        out = (out, {k: state.tapped[k] for k in taps})
    missed_marks = [k for k in state.mark_edits if k not in state.reached_marks]
    if missed_marks:
        raise ValueError(
            f"{what}: {len(missed_marks)} edited marks are never met in this forward pass: "
            f"{[marks_lib.key_str(k) for k in missed_marks[:5]]} (jpeft.probe(...).marks lists "
            f"the marks a forward pass has)")
    missed = [p for p in state.edits if p not in state.reached]
    if missed:
        raise ValueError(
            f"{what}: {len(missed)} adapted weights never enter a contraction in this forward "
            f"pass, so the factored form cannot reach them: "
            f"{[paths_lib.path_str(p) for p in missed[:5]]}"
            + _other_note(state, missed))
    mixed = [p for p in state.edits if p in state.other]
    if mixed:
        raise ValueError(
            f"{what}: adapted weights are also used outside contractions, where a factored edit "
            f"cannot follow them: "
            + "; ".join(f"{paths_lib.path_str(p)} (by {', '.join(sorted(state.other[p]))})"
                        for p in mixed[:5])
            + ". Use mode='materialised' for them, or leave them out of the targets.")
    return out


def _other_note(state: _State, paths) -> str:
    notes = [f"{paths_lib.path_str(p)} is used by {', '.join(sorted(state.other[p]))}"
             for p in paths if p in state.other]
    return f" ({'; '.join(notes[:5])})" if notes else ""


def probe(fn: Callable[..., Any], params: Any, args: tuple, kwargs: dict) -> sites_lib.Sites:
    """The :class:`~jpeft.core.sites.Sites` of ``fn(params, *args, **kwargs)`` (abstract)."""
    state = _State(None, record=True, rng=None)
    to_abstract = lambda x: (jax.ShapeDtypeStruct(np.shape(x), x.dtype)
                             if isinstance(x, (jax.Array, np.ndarray)) else x)
    params, args, kwargs = jax.tree_util.tree_map(to_abstract, (params, args, kwargs))
    dyn_leaves = [x for x in jax.tree_util.tree_leaves((params, args, kwargs)) if _is_dynamic(x)]
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dyn_pos = [i for i, x in enumerate(leaves) if _is_dynamic(x)]

    def run(*dyn_vals):
        full = list(leaves)
        for i, v in zip(dyn_pos, dyn_vals):
            full[i] = v
        p, a, k = jax.tree_util.tree_unflatten(treedef, full)
        return _run(fn, p, a, k, state)

    jax.eval_shape(run, *dyn_leaves)
    contractions, conflicts = {}, {}
    for path, uses in state.uses.items():
        layouts = {(u.kind, u.stack, u.contract, u.free, u.scanned) for u in uses}
        if len(layouts) > 1:
            conflicts[path] = "; ".join(
                f"{k}: stack {sorted(s)} contract {sorted(c)} free {sorted(f)}"
                for k, s, c, f, _ in sorted(layouts, key=str))
            continue
        kind, s, c, f, scanned = layouts.pop()
        contractions[path] = sites_lib.Contraction(
            kind, tuple(sorted(s)), tuple(sorted(c)), tuple(sorted(f)), len(uses),
            tuple(sorted(state.other.get(path, ()))), scanned)
    other = {p: tuple(sorted(u)) for p, u in state.other.items()
             if p not in contractions and p not in conflicts}
    marks = {}
    for key, calls in state.marks.items():
        shapes = {c[0] for c in calls}
        marks[key] = sites_lib.Mark(key[0], key[1], shapes.pop() if len(shapes) == 1 else None,
                                    calls[0][1], calls[0][2], len(calls))
    order = {p: i for i, p in enumerate(paths_lib.flatten(params))}
    sort = lambda d: dict(sorted(d.items(), key=lambda kv: order.get(kv[0], len(order))))
    return sites_lib.Sites(sort(contractions), sort(conflicts), sort(other), marks)
