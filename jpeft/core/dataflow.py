"""The data-flow backend: contraction sites found and edited in the traced program itself.

``apply_fn(params, *args)`` is traced once to a jaxpr (``jax.make_jaxpr``) and evaluated again
equation by equation, inside whatever transformation the caller is under (``jit``, ``grad``,
``vmap``). Every parameter leaf enters as one input variable, so the evaluator knows, for every
value, whether it *is* a parameter leaf seen through layout operations: a :class:`View` of that
leaf, which records how each of the value's axes derives from the leaf's axes and the operations
that made it. When a view enters a ``dot_general``, ``conv_general_dilated`` or ``ragged_dot``:

* :func:`probe` records the layout of the contraction (:class:`jpeft.core.sites.Contraction`);
* :func:`call` computes the op as written and then applies the method's
  :class:`~jpeft.core.sites.ContractionEdit` for that leaf to the result, with the edit's factors
  taken through the same layout operations as the weight.

**Views.** Casts, copies, sharding hints, barriers and ``stop_gradient`` keep a view as it is
(``stop_gradient`` freezes the base weight, which jpeft does anyway; the delta still trains);
transposes permute its axes; reshapes split and merge axes (:class:`~jpeft.core.sites.Axis`),
static slices, ``rev`` and ``dynamic_slice`` (an index by a loop counter) cut it, squeezes drop
indexed axes, broadcasts add axes, and a ``gather`` taking whole slices (``w[idx]``, MoE experts
routed per token) indexes one axis. A layer scan slices it (the factors that share the scanned
axis go into the scan as operands, so each iteration sees its own slice). An integer weight
dequantized in the program (``q.astype(f) * scale``) is followed from the product on, and
:func:`jpeft.weight` names any value as a weight (a dequantized NF4 weight).

**Exact or refused.** Wherever an edited weight is used in a way a factored edit cannot follow
(any other primitive: a lookup of a tied embedding, a ``custom_vjp``/``custom_jvp`` function, a
``shard_map`` or kernel call, a layout the method's edit does not follow), the backend substitutes
the edited weight itself there (``ContractionEdit.weight``: ``W + s A B`` for LoRA), taken through
the same layout operations, so the result is exact; a method that cannot form it is refused with an
error naming the weight, the primitive and the way out. Custom-derivative functions are bound with
their own rules (never inlined away) unless their primal declares that its rule is autodiff's own
(:func:`same_derivative`, as :func:`jpeft.ops.flat_tokens.per_token` does). A nested ``jit`` is
inlined with its ``in_shardings``/``out_shardings`` kept as sharding constraints; ``remat``,
``scan``, ``cond`` and ``while`` are re-emitted around the evaluated bodies. Equations that no view
reaches are bound unchanged, so the compiled program is the model's own plus the edits.

Every primitive name and parameter layout read here comes from :mod:`jpeft.core.compat`.
Compared with monkey-patching ``jax.lax.dot_general`` (google/qwix's interception) this needs no
patching, keeps ``jit`` on, and identifies a weight by data flow, not by object identity or name.
"""

from __future__ import annotations

import collections
import itertools
import zlib
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jpeft.core import compat
from jpeft.core import marks as marks_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib

Path = paths_lib.Path
Axis = sites_lib.Axis
Factor = sites_lib.Factor
cover = sites_lib.cover

#: The mark kind :func:`weight` gives a value, and the one :func:`same_derivative` places.
WEIGHT_KIND = "weight"
SAME_DERIVATIVE_KIND = "same-derivative"


def weight(value: jax.Array, path: Path | str) -> jax.Array:
    """``value`` unchanged, named as the weight at ``path`` of the parameter tree.

    For values data flow cannot trace back to one parameter leaf: a weight dequantized from NF4
    codes and block scales (:func:`jpeft.dequantizing` emits it), a weight assembled by the model. The
    contractions of the named value are sites of ``path``; its edits apply there as to a leaf.
    Place it outside layer scans (on the whole stacked weight). Identity, no cost."""
    path = paths_lib.path_str(path) if isinstance(path, tuple) else str(path)
    return marks_lib.mark(value, path, WEIGHT_KIND)


def same_derivative(value: jax.Array) -> jax.Array:
    """``value`` unchanged; placed in the primal of a ``jax.custom_vjp``/``custom_jvp`` function,
    it declares that the function's rule computes autodiff's own derivative of that primal (only
    differently, e.g. on flattened tokens), so jpeft may inline the function and edit inside it.
    Functions without it are bound with their rules; edited weights entering them are
    substituted whole."""
    return checkpoint_name(value, f"{marks_lib.PREFIX}{SAME_DERIVATIVE_KIND}:")


class Step(NamedTuple):
    """One layout operation between a weight and its use: ``replay(x)`` applies it to a value of
    the weight (same layout as its input), ``factor(f)`` to a factor laid out along the input's
    axes (its output is laid out along the output's axes)."""
    replay: Callable[[Any], Any]
    factor: Callable[[Factor], Factor]


class View(NamedTuple):
    """A value that is a parameter leaf seen through layout operations.

    Attributes:
      path: the leaf's path.
      axes: per axis of the value, the leaf axis it is (``int``) or an :class:`Axis` derived by
        a layout operation.
      root: the value :attr:`steps` start from: the leaf itself, the slice a layer scan gives,
        or a value named as the weight (:func:`weight`, a dequantization).
      root_axes: the axes of ``root`` (as ``axes``).
      root_key: the key of the factors laid out along ``root`` in the evaluator's scope.
      steps: the layout operations from ``root`` to the value.
      indexed: leaf axes indexed away on the way (scan slices, indexing), outermost first.
      through: names of the operations other than casts and transposes since the leaf.
      dtype: the root's dtype.
    """
    path: Path
    axes: tuple
    root: Any
    root_axes: tuple
    root_key: Any
    steps: tuple = ()
    indexed: tuple = ()
    through: frozenset = frozenset()
    dtype: Any = None

    @property
    def plain(self) -> bool:
        """Only casts, copies, transposes and scan slices since the leaf."""
        return not self.through

    def factors(self, fs: Mapping[str, Factor]) -> dict:
        """``fs`` (laid out along ``root``) taken through :attr:`steps`."""
        out = {}
        for name, f in fs.items():
            for st in self.steps:
                f = st.factor(f)
            out[name] = f
        return out

    def replay(self, w):
        """``w`` (a value like ``root``) taken through :attr:`steps`."""
        for st in self.steps:
            w = st.replay(w)
        return w


class _Use(NamedTuple):
    kind: str
    stack: frozenset
    contract: frozenset
    free: frozenset
    scanned: tuple
    through: frozenset
    dtype: str


class _State:
    """Per-call bookkeeping shared by every nesting level."""

    def __init__(self, edits: Mapping[Path, sites_lib.ContractionEdit] | None, record: bool,
                 rng: Any, marks: Mapping[tuple, sites_lib.MarkEdit] | None = None,
                 taps: frozenset = frozenset(), what: str = "wrap"):
        self.edits = dict(edits or {})
        self.taps = frozenset(taps)
        self.mark_edits = dict(marks or {})
        read_only = [marks_lib.key_str(k) for k in self.mark_edits if k[1] in marks_lib.READ_ONLY]
        if read_only:
            raise ValueError(f"{what}: {read_only} are read-only hook points (the model computes "
                             f"them for methods to read, not to use): an edit there would change "
                             f"nothing; edit the values the model uses instead")
        self.record = record
        self.rng = rng
        self.what = what
        self.uses: dict[Path, list[_Use]] = {}
        self.other: dict[Path, set[str]] = {}
        self.conflicts: dict[Path, str] = {}
        self.reached: set[Path] = set()
        self.marks: dict[tuple, list] = {}           # key -> [(shape, dtype, scan lengths)]
        self.reached_marks: set[tuple] = set()
        self.tapped: dict = {}
        self.heads: dict[int, tuple] = {}            # id(value) -> (value, weight paths)
        self.output_heads: frozenset = frozenset()
        self._names: dict[int, frozenset] = {}
        self._uid = itertools.count()

    def uid(self) -> int:
        return next(self._uid)

    def names_in(self, jaxpr) -> frozenset:
        """``checkpoint_name`` names inside ``jaxpr`` (nested ones included), as mark keys."""
        jaxpr = compat.open_jaxpr(jaxpr)
        if id(jaxpr) not in self._names:
            found = set()
            for eqn in jaxpr.eqns:
                if compat.kind(eqn) == "name":
                    found.add(marks_lib.parse(compat.name_of(eqn)))
                for sub in compat.subjaxprs(eqn):
                    found |= self.names_in(sub)
            self._names[id(jaxpr)] = frozenset(found)
        return self._names[id(jaxpr)]

    def names_of(self, eqn) -> frozenset:
        return frozenset().union(*(self.names_in(j) for j in compat.subjaxprs(eqn)))

    def enters(self, eqn) -> bool:
        """Whether a higher-order equation no parameter view reaches must still be entered: it
        holds marks to record or to edit, or names a weight (:func:`weight`)."""
        if not compat.is_higher_order(eqn):
            return False
        for k in self.names_of(eqn):
            if k[1] == WEIGHT_KIND:
                if self.record or k[0] in self.edits:
                    return True
            elif k[1] != SAME_DERIVATIVE_KIND and (self.record or k in self.mark_edits
                                                   or k in self.taps):
                return True
        return False

    def inlines(self, eqn) -> bool:
        """Whether ``eqn`` is a custom-derivative function whose rule is autodiff's own
        (:func:`same_derivative`): followed, and differentiated by autodiff, as before it had a
        rule (its weights' gradients then never formed)."""
        return any(k[1] == SAME_DERIVATIVE_KIND for k in self.names_of(eqn))

    def no_taps_in(self, eqn, what: str) -> None:
        inside = [k for k in self.names_of(eqn) if k in self.taps]
        if inside:
            raise ValueError(f"observe: mark {marks_lib.key_str(inside[0])} is inside a {what}; "
                             f"its values cannot be returned from there")


class _Scope(NamedTuple):
    """Per-nesting-level context: the factors of each edit laid out along each view root
    (``{root key: {name: Factor}}``) and the arrays of each mark edit, the iteration indices and
    lengths of the enclosing layer scans, and the marks seen so far that this level can read (a
    fresh copy in every traced body, so no value leaks out)."""
    factors: Mapping[Any, Mapping[str, Factor]]
    index: tuple
    arrays: Mapping[tuple, Mapping[str, Any]] = {}
    lengths: tuple = ()
    seen: dict | None = None
    taps: dict | None = None

    def body(self, **changes) -> "_Scope":
        return self._replace(seen=dict(self.seen or {}), taps={}, **changes)


def _is_dynamic(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


#: Traces of the functions jpeft follows, most recent last: ``{(fn, tree structure, abstract
#: values of the arrays, static arguments): (closed jaxpr, output tree)}``. A trace depends on
#: nothing else (the function is pure, as ``jax.jit`` assumes too), so :func:`probe` and every
#: :func:`jpeft.wrap` of the same function share it: a wrapped model called with the shapes it
#: was probed with is not traced again.
_TRACES: collections.OrderedDict = collections.OrderedDict()
TRACE_CACHE_SIZE = 64


def _trace(fn, params, args, kwargs):
    """``(closed_jaxpr, out_tree, dyn_values, n_param_leaves, param_paths)`` for ``fn``, from
    :data:`_TRACES` where it holds the trace (traces that captured values of an enclosing trace
    are not kept)."""
    p_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    param_paths = [paths_lib.to_path(kp) for kp, _ in p_leaves]
    for path, (_, leaf) in zip(param_paths, p_leaves):
        if not _is_dynamic(leaf):
            raise TypeError(f"params leaf {paths_lib.path_str(path)} is a {type(leaf).__name__}, "
                            f"not an array")
    leaves, treedef = jax.tree_util.tree_flatten((params, args, kwargs))
    dyn_pos = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
    dyn = [leaves[i] for i in dyn_pos]
    dynamic = set(dyn_pos)
    key = (fn, treedef, tuple(compat.aval_of(x) for x in dyn),
           tuple(x for i, x in enumerate(leaves) if i not in dynamic))
    try:
        hit = _TRACES.get(key)
    except TypeError:                          # an unhashable function or static argument
        key, hit = None, None
    if hit is not None:
        _TRACES.move_to_end(key)
        return (*hit, dyn, len(p_leaves), param_paths)

    def flat_fn(*dyn_vals):
        full = list(leaves)
        for i, v in zip(dyn_pos, dyn_vals):
            full[i] = v
        p, a, k = jax.tree_util.tree_unflatten(treedef, full)
        return fn(p, *a, **k)

    with marks_lib.framework_marks():
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dyn)
    out_tree = jax.tree_util.tree_structure(out_shape)
    if key is not None and not any(compat.is_tracer(c) for c in closed.consts):
        _TRACES[key] = (closed, out_tree)
        while len(_TRACES) > TRACE_CACHE_SIZE:
            _TRACES.popitem(last=False)
    return closed, out_tree, dyn, len(p_leaves), param_paths


def _read(env, v):
    return v.val if isinstance(v, compat.Literal) else env[v]


def _eval(jaxpr, consts, args, tags, state: _State, scope: _Scope):
    """Evaluate ``jaxpr`` on ``args`` (with :class:`View` tags or ``None``); returns
    ``(outputs, output tags)``. While staging a call (not a probe), each run of consecutive
    equations that nothing edits is bound as one :func:`_segment`."""
    env: dict = {}
    tagenv: dict = {}
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x, t in zip(jaxpr.invars, args, tags):
        env[v] = x
        if t is not None:
            tagenv[v] = t
    staged = not state.record and compat.staging()
    run = None                                  # start of the pending run of plain equations
    for i, eqn in enumerate(jaxpr.eqns):
        intags = [None if isinstance(v, compat.Literal) else tagenv.get(v) for v in eqn.invars]
        kind = compat.kind(eqn)
        tagged = any(t is not None for t in intags)
        if staged and not tagged and not eqn.effects and kind != "name" and not state.enters(eqn):
            run = i if run is None else run
            continue
        if run is not None:
            _bind_run(jaxpr, run, i, env)
            run = None
        invals = [_read(env, v) for v in eqn.invars]
        if kind == "name":
            outvals, outtags = _mark(eqn, invals, intags, state, scope)
        elif state.enters(eqn) or (tagged and (
                state.record or not compat.is_higher_order(eqn) or state.inlines(eqn)
                or any(t is not None and t.path in state.edits for t in intags))):
            outvals, outtags = _RULES.get(kind, _other_use)(eqn, invals, intags, state, scope)
        else:      # nothing to change here (a call is entered only where an edit needs it)
            outvals, outtags = compat.bind(eqn, invals), [None] * len(eqn.outvars)
        if state.record:
            _follow_heads(kind, invals, intags, outvals, state)
        for v, x, t in zip(eqn.outvars, outvals, outtags):
            if isinstance(v, compat.DropVar):
                continue
            env[v] = x
            if t is not None:
                tagenv[v] = t
    if run is not None:
        _bind_run(jaxpr, run, len(jaxpr.eqns), env)
    outs = [_read(env, v) for v in jaxpr.outvars]
    out_tags = [None if isinstance(v, compat.Literal) else tagenv.get(v) for v in jaxpr.outvars]
    return outs, out_tags


# --------------------------------------------------------------------------------------------
# Segments: what the edits do not touch, bound as a whole


class _Segment(NamedTuple):
    """Equations ``start:end`` of a jaxpr as one function of the values they read from before
    (``inputs``) to those read after them (``outputs``)."""
    fn: Callable | None
    inputs: tuple
    outputs: tuple


#: ``{(jaxpr, start, end): _Segment}``, and the segment functions by the structure of their
#: equations (:func:`_structure`), so that the same run in every layer of a model shares one
#: function, hence one linearization, as every layer shares ``jax.numpy``'s jitted functions.
_SEGMENTS: collections.OrderedDict = collections.OrderedDict()
_SEGMENT_FNS: collections.OrderedDict = collections.OrderedDict()
SEGMENT_CACHE_SIZE = 4096
#: Shorter runs are bound equation by equation.
MIN_SEGMENT = 2


def _bind_run(jaxpr, start: int, end: int, env: dict) -> None:
    """Bind equations ``start:end`` of ``jaxpr`` (none of which an edit touches) on ``env``.

    Bound one by one, each equation would be linearized on its own by ``jax.grad`` (JAX's
    generic rule traces a JVP per equation: most of the cost of tracing a model's gradient);
    bound as a segment, the run is linearized once and JAX caches that for every later trace.
    The staged program is the same equations either way."""
    seg = _segment(jaxpr, start, end) if end - start >= MIN_SEGMENT else None
    if seg is None or seg.fn is None:
        for eqn in jaxpr.eqns[start:end]:
            outs = compat.bind(eqn, [_read(env, v) for v in eqn.invars])
            for v, x in zip(eqn.outvars, outs):
                if not isinstance(v, compat.DropVar):
                    env[v] = x
        return
    if seg.outputs:
        for v, x in zip(seg.outputs, seg.fn(*[env[v] for v in seg.inputs])):
            env[v] = x


def _last_uses(jaxpr) -> dict:
    """``{var: index of the last equation reading it}`` (the output: ``len(eqns)``)."""
    hit = _SEGMENTS.get((jaxpr, "last uses"))
    if hit is None:
        hit = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if not isinstance(v, compat.Literal):
                    hit[v] = i
        for v in jaxpr.outvars:
            if not isinstance(v, compat.Literal):
                hit[v] = len(jaxpr.eqns)
        _remember(_SEGMENTS, (jaxpr, "last uses"), hit)
    return hit


def _remember(cache: collections.OrderedDict, key, value) -> None:
    cache[key] = value
    while len(cache) > SEGMENT_CACHE_SIZE:
        cache.popitem(last=False)


def _segment(jaxpr, start: int, end: int) -> _Segment:
    key = (jaxpr, start, end)
    hit = _SEGMENTS.get(key)
    if hit is not None:
        _SEGMENTS.move_to_end(key)
        return hit
    eqns = jaxpr.eqns[start:end]
    last = _last_uses(jaxpr)
    inputs, defined = [], set()
    for eqn in eqns:
        for v in eqn.invars:
            if not isinstance(v, compat.Literal) and v not in defined:
                defined.add(v)
                inputs.append(v)
        defined.update(eqn.outvars)
    outputs = [v for eqn in eqns for v in eqn.outvars
               if not isinstance(v, compat.DropVar) and last.get(v, -1) >= end]
    structure = _structure(eqns, inputs, outputs)
    try:
        fn = _SEGMENT_FNS.get(structure)
    except TypeError:                      # a parameter that cannot be hashed: not shared
        structure, fn = None, None
    if fn is None:
        fn = compat.segment_fn(inputs, outputs, eqns)
        if structure is not None:
            _remember(_SEGMENT_FNS, structure, fn)
    seg = _Segment(fn, tuple(inputs), tuple(outputs))
    _remember(_SEGMENTS, key, seg)
    return seg


def _structure(eqns, inputs, outputs) -> tuple:
    """What a segment computes, without its variables' identities: input types, then per
    equation its primitive, parameters, operands (an input's or an earlier result's position, a
    literal's value), result types and context, then the results' positions."""
    where = {v: ("in", i) for i, v in enumerate(inputs)}
    parts: list = [tuple(v.aval for v in inputs)]
    for k, eqn in enumerate(eqns):
        refs = tuple(("literal", _literal_key(v)) if isinstance(v, compat.Literal) else where[v]
                     for v in eqn.invars)
        parts.append((eqn.primitive, tuple(sorted(eqn.params.items())), refs,
                      tuple(v.aval for v in eqn.outvars), eqn.ctx))
        for j, v in enumerate(eqn.outvars):
            where[v] = ("eqn", k, j)
    parts.append(tuple(where[v] for v in outputs))
    return tuple(parts)


def _literal_key(v) -> tuple:
    val = np.asarray(v.val)
    return val.dtype.str, val.shape, val.tobytes(), v.aval


def _follow_heads(kind: str, invals, intags, outvals, state: _State) -> None:
    """Probe only: which contraction outputs reach the model's outputs as they are (through
    layout operations, elementwise functions and arithmetic with parameters or constants: a
    bias, a soft cap), marking their weights as output heads (a classifier, a language-model
    head). A residual add, a normalisation or another contraction in between ends it."""
    if kind in _CONTRACTIONS:
        views = [t for t in intags if t is not None]
        if len(views) == 1:
            state.heads[id(outvals[0])] = (outvals[0], frozenset((views[0].path,)))
        return
    if kind not in _HEAD_KEEPING or len(outvals) != 1:
        return
    found, others_ok = frozenset(), True
    for v, t in zip(invals, intags):
        h = state.heads.get(id(v))
        if h is not None and h[0] is v:
            found |= h[1]
        elif t is None and np.ndim(v) > 0 and not isinstance(v, np.ndarray):
            others_ok = False                # another activation: a residual stream, a mask
    if found and others_ok:
        state.heads[id(outvals[0])] = (outvals[0], found)


_CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated", "ragged_dot_general"})
_HEAD_KEEPING = compat.IDENTITIES | {
    "transpose", "reshape", "squeeze", "broadcast_in_dim", "slice", "rev", "add", "sub", "mul",
    "div", "neg", "tanh", "logistic", "max", "min", "integer_pow", "copy", "name"}


def _heads(outs, state: _State) -> frozenset:
    found = frozenset()
    for o in outs:
        h = state.heads.get(id(o))
        if h is not None and h[0] is o:
            found |= h[1]
    return found


# --------------------------------------------------------------------------------------------
# The edited weight, where a factored edit cannot follow


def _substitute(view: View, prim: str, state: _State, scope: _Scope):
    """The edited weight as ``view`` sees it (``ContractionEdit.weight`` at the view's root, taken
    through its steps), for a use by ``prim`` that the factored edit cannot follow."""
    edit = state.edits[view.path]
    if edit.weight is None:
        raise ValueError(
            f"{state.what}: {paths_lib.path_str(view.path)} is used by {prim}, where the "
            f"method's factored edit cannot follow it, and the method cannot form the edited "
            f"weight there; use mode='materialised', or leave the weight out of the targets")
    w = edit.weight(view.root, scope.factors[view.root_key], view.root_axes)
    state.reached.add(view.path)
    return view.replay(jnp.asarray(w).astype(view.root.dtype))


def _note_other(state: _State, tags, what: str) -> None:
    """Record ``what`` as a use the factored form cannot follow, for every view in ``tags`` (for
    rows looked up from the weight, ``"gather"``: an embedding lookup)."""
    for t in tags:
        if t is not None:
            state.other.setdefault(t.path, set()).add("gather" if "gather" in t.through else what)


def _edited_inputs(eqn, invals, intags, state, scope, what: str) -> list:
    """``invals`` with every view of an edited weight replaced by the edited weight."""
    _note_other(state, intags, what)
    return [_substitute(t, what, state, scope) if t is not None and t.path in state.edits else v
            for v, t in zip(invals, intags)]


def _other_use(eqn, invals, intags, state, scope):
    """Any primitive without a rule: bound as written, edited weights substituted whole. A
    higher-order primitive (``shard_map``, ``pallas_call``, ...) is not entered: marks inside
    it cannot be edited."""
    what = eqn.primitive.name
    if compat.is_higher_order(eqn):
        edited = [k for k in state.names_of(eqn) if k in state.mark_edits or k in state.taps]
        if edited:
            raise ValueError(
                f"{state.what}: mark {marks_lib.key_str(edited[0])} is inside a {what} call, "
                f"which jpeft does not enter; its edit cannot be applied there (move the mark "
                f"outside the {what} call)")
        if state.record and any(t is not None for t in intags):
            _record_inside(eqn, invals, intags, state, scope)
    return compat.bind(eqn, _edited_inputs(eqn, invals, intags, state, scope, what)), \
        [None] * len(eqn.outvars)


def _record_inside(eqn, invals, intags, state, scope) -> None:
    """Probe only: the contractions of weights inside a ``shard_map`` body, recorded from the
    body as each device runs it (the same axes, shard-sized), so that methods can shape their
    factors; the call itself substitutes the edited weight whole."""
    body = compat.mapped_body(eqn) if compat.kind(eqn) == "shard_map" else None
    if body is None:
        return
    run = compat.mapped_again(eqn, lambda *xs: tuple(
        _eval(body.jaxpr, body.consts, xs, intags, state, scope.body())[0]))
    run(*invals)


# --------------------------------------------------------------------------------------------
# Layout operations: views


def _derive(state: _State, view: View, axes: tuple, op: str | None, replay, factor) -> View:
    """``view`` after one layout operation ``op`` (``None``: a cast or transpose) with output
    axes ``axes``; leaf axes no output axis covers any more are indexed away."""
    before = frozenset().union(*map(cover, view.axes)) if view.axes else frozenset()
    after = frozenset().union(*map(cover, axes)) if axes else frozenset()
    gone = tuple(sorted(before - after))
    through = view.through | {op} if op else view.through
    return view._replace(axes=tuple(axes), steps=view.steps + (Step(replay, factor),),
                         indexed=view.indexed + gone, through=through)


def _same(f: Factor) -> Factor:
    return f


def _replayer(eqn, invals, pos: int):
    """``x -> eqn`` bound with ``x`` as operand ``pos`` and the other operands as they were."""
    def replay(x):
        vals = list(invals)
        vals[pos] = x
        return compat.bind(eqn, vals)[0]
    return replay


def _stopped(f: Factor) -> Factor:
    return Factor(jax.lax.stop_gradient(f.value), f.axes)


def _identity(eqn, invals, intags, state, scope):
    """Casts, copies, placement, sharding hints, barriers: the view goes on. A gradient stop
    stops the factors' gradient at that use too, as it would stop the merged weight's."""
    outs = compat.bind(eqn, invals)
    if len(invals) == 1:
        t = intags[0]
        stops = compat.kind(eqn) in compat.GRADIENT_STOPS
        return outs, [_derive(state, t, t.axes, None, _replayer(eqn, invals, 0),
                              _stopped if stops else _same)]
    return outs, [t if i < len(intags) else None for i, t in enumerate(intags)][:len(outs)]


def _transpose(eqn, invals, intags, state, scope):
    t = intags[0]
    perm = compat.transpose_perm(eqn)
    return compat.bind(eqn, invals), [
        _derive(state, t, tuple(t.axes[p] for p in perm), None, _replayer(eqn, invals, 0),
                _same)]


def _factor_pos(f: Factor, axis) -> int | None:
    return f.axes.index(axis) if axis in f.axes else None


def _on_axes(f: Factor, changes: Mapping[Any, Callable[[Any, int], Any]]) -> Factor:
    """``f`` with ``changes[axis](value, position)`` applied along each axis it has."""
    v = f.value
    for axis, fn in changes.items():
        pos = _factor_pos(f, axis)
        if pos is not None:
            v = fn(v, pos)
    return Factor(v, f.axes)


def _squeeze(eqn, invals, intags, state, scope):
    t = intags[0]
    dims = compat.squeeze_dims(eqn)
    gone = [t.axes[d] for d in dims]
    axes = tuple(a for i, a in enumerate(t.axes) if i not in dims)

    def factor(f):
        keep = [i for i, a in enumerate(f.axes) if a not in gone]
        idx = tuple(slice(None) if a not in gone else 0 for a in f.axes)
        return Factor(f.value[idx], tuple(f.axes[i] for i in keep))
    return compat.bind(eqn, invals), [
        _derive(state, t, axes, "squeeze", _replayer(eqn, invals, 0), factor)]


def _reshape_groups(old: tuple, new: tuple):
    """Pair the axes of ``old`` and ``new`` (sizes, same product) into groups of equal
    product: ``[(old axes, new axes)]``; axes of size 1 are left out (``None`` on failure)."""
    o = [i for i, d in enumerate(old) if d != 1]
    n = [j for j, d in enumerate(new) if d != 1]
    groups, i, j = [], 0, 0
    while i < len(o) and j < len(n):
        go, gn = [o[i]], [n[j]]
        po, pn = old[o[i]], new[n[j]]
        i, j = i + 1, j + 1
        while po != pn:
            if po < pn and i < len(o):
                go.append(o[i])
                po *= old[o[i]]
                i += 1
            elif pn < po and j < len(n):
                gn.append(n[j])
                pn *= new[n[j]]
                j += 1
            else:
                return None
        groups.append((go, gn))
    return groups if i == len(o) and j == len(n) else None


def _reshape(eqn, invals, intags, state, scope):
    t = intags[0]
    outs = compat.bind(eqn, invals)
    new_sizes, dimensions = compat.reshape_sizes(eqn)
    old_shape = tuple(np.shape(invals[0]))
    groups = None if dimensions is not None else _reshape_groups(old_shape, new_sizes)
    if groups is None:
        return _other_use(eqn, invals, intags, state, scope)
    axes: list = [None] * len(new_sizes)
    plan = []                     # (old labels, new labels, new sizes) of each regrouping
    for go, gn in groups:
        olds = [t.axes[i] for i in go]
        if len(go) == 1 and len(gn) == 1:
            axes[gn[0]] = olds[0]
            continue
        span = frozenset().union(*map(cover, olds))
        op = "split" if len(go) == 1 else "merge"
        news = [Axis(op, state.uid(), span) for _ in gn]
        for j, a in zip(gn, news):
            axes[j] = a
        plan.append((olds, news, [new_sizes[j] for j in gn]))
    for j, d in enumerate(new_sizes):
        if axes[j] is None:                             # a new axis of size 1
            axes[j] = Axis("expand", state.uid(), frozenset())
    dropped = [t.axes[i] for i, d in enumerate(old_shape) if d == 1]
    what = paths_lib.path_str(t.path)

    def factor(f):
        v, fa = f.value, list(f.axes)
        for a in dropped:                               # size-1 axes the reshape drops
            if a in fa:
                pos = fa.index(a)
                v = jnp.squeeze(v, pos)
                del fa[pos]
        for olds, news, sizes in plan:
            have = [a for a in olds if a in fa]
            if not have:
                continue
            if len(have) != len(olds):
                raise ValueError(
                    f"{what}: a reshape merges weight axes {sorted(map(str, olds))} of which "
                    f"this factor holds only {sorted(map(str, have))}; the factored edit cannot "
                    f"follow it (use mode='materialised')")
            pos = [fa.index(a) for a in olds]          # the group first, in the reshape's order
            rest = [i for i in range(len(fa)) if i not in pos]
            v = jnp.transpose(v, pos + rest)
            v = v.reshape(tuple(sizes) + v.shape[len(pos):])
            fa = list(news) + [fa[i] for i in rest]
        return Factor(v, tuple(fa))
    return outs, [_derive(state, t, tuple(axes), "reshape", _replayer(eqn, invals, 0), factor)]


def _broadcast(eqn, invals, intags, state, scope):
    if any(t is not None for t in intags[1:]):
        return _other_use(eqn, invals, intags, state, scope)
    t = intags[0]
    shape, bdims = compat.broadcast_dims(eqn)
    old_shape = np.shape(invals[0])
    axes: list = [None] * len(shape)
    grow = {}
    for i, j in enumerate(bdims):
        axes[j] = t.axes[i]
        if old_shape[i] != shape[j]:
            grow[t.axes[i]] = shape[j]
    for j in range(len(shape)):
        if axes[j] is None:
            axes[j] = Axis("broadcast", state.uid(), frozenset())

    def factor(f):
        return _on_axes(f, {a: (lambda v, p, n=n: jnp.repeat(v, n, axis=p))
                            for a, n in grow.items()})
    return compat.bind(eqn, invals), [
        _derive(state, t, tuple(axes), "broadcast", _replayer(eqn, invals, 0), factor)]


def _slice(eqn, invals, intags, state, scope):
    t = intags[0]
    start, limit, strides = compat.slice_bounds(eqn)
    shape = np.shape(invals[0])
    strides = strides or (1,) * len(shape)
    cut = {t.axes[i]: (s, e, k) for i, (s, e, k, d) in enumerate(zip(start, limit, strides, shape))
           if (s, e, k) != (0, d, 1)}

    def factor(f):
        return _on_axes(f, {a: (lambda v, p, b=b: jax.lax.slice_in_dim(v, *b, axis=p))
                            for a, b in cut.items()})
    return compat.bind(eqn, invals), [
        _derive(state, t, t.axes, "slice", _replayer(eqn, invals, 0), factor)]


def _split(eqn, invals, intags, state, scope):
    """``jnp.split`` of a weight: each piece is a slice of it along the split axis."""
    t = intags[0]
    axis, sizes = compat.split_sizes(eqn)
    outs = compat.bind(eqn, invals)
    label, tags, start = t.axes[axis], [], 0
    for i, n in enumerate(sizes):
        def factor(f, b=(start, start + n)):
            return _on_axes(f, {label: lambda v, p: jax.lax.slice_in_dim(v, *b, axis=p)})
        replay = lambda x, i=i: compat.bind(eqn, [x])[i]
        tags.append(_derive(state, t, t.axes, "slice", replay, factor))
        start += n
    return outs, tags


def _rev(eqn, invals, intags, state, scope):
    t = intags[0]
    flipped = [t.axes[d] for d in compat.rev_dims(eqn)]

    def factor(f):
        return _on_axes(f, {a: (lambda v, p: jnp.flip(v, p)) for a in flipped})
    return compat.bind(eqn, invals), [
        _derive(state, t, t.axes, "rev", _replayer(eqn, invals, 0), factor)]


def _dynamic_slice(eqn, invals, intags, state, scope):
    if any(t is not None for t in intags[1:]):
        return _other_use(eqn, invals, intags, state, scope)
    t = intags[0]
    sizes = compat.dynamic_slice_sizes(eqn)
    shape = np.shape(invals[0])
    starts = invals[1:]
    cut = {t.axes[i]: (starts[i], n) for i, (n, d) in enumerate(zip(sizes, shape)) if n != d}

    def factor(f):
        return _on_axes(f, {a: (lambda v, p, s=s, n=n: jax.lax.dynamic_slice_in_dim(v, s, n, p))
                            for a, (s, n) in cut.items()})
    return compat.bind(eqn, invals), [
        _derive(state, t, t.axes, "index", _replayer(eqn, invals, 0), factor)]


def _gather(eqn, invals, intags, state, scope):
    t = intags[0]
    take = None if t is None or intags[1] is not None else compat.gather_take(
        eqn, np.shape(invals[0]), np.shape(invals[1]))
    mode = None if take is None else compat.take_mode(take)
    if take is None or mode is None:
        return _other_use(eqn, invals, intags, state, scope)
    outs = compat.bind(eqn, invals)
    src = t.axes[take.axis]
    index_axes = tuple(Axis("take", state.uid(), cover(src)) for _ in range(take.n_index_axes))
    rest = iter(a for i, a in enumerate(t.axes) if i != take.axis)
    pos = {r: k for k, r in enumerate(take.result_axes)}
    axes = tuple(index_axes[pos[i]] if i in pos else next(rest) for i in range(np.ndim(outs[0])))
    idx = invals[1][..., 0]

    def factor(f):
        p = _factor_pos(f, src)
        if p is None:
            return f
        v = jnp.take(f.value, idx, axis=p, mode=mode, fill_value=take.fill_value)
        return Factor(v, f.axes[:p] + index_axes + f.axes[p + 1:])
    return outs, [_derive(state, t, axes, "gather", _replayer(eqn, invals, 0), factor)]


def _mul(eqn, invals, intags, state, scope):
    """An integer weight dequantized in the program, ``q.astype(f) * scale``: the product (of
    the same shape as ``q``) is followed as that weight, the dequantized values as its root (the
    factors, laid out by axis, need no change). Any other product is another use."""
    ints = [i for i, t in enumerate(intags) if t is not None and t.plain
            and jnp.issubdtype(t.dtype, jnp.integer)]
    shape = np.broadcast_shapes(*map(np.shape, invals))
    if len(ints) != 1 or shape != np.shape(invals[ints[0]]):
        return _other_use(eqn, invals, intags, state, scope)
    q = intags[ints[0]]
    _note_other(state, [t for i, t in enumerate(intags) if i != ints[0]], "mul")
    outs = compat.bind(eqn, invals)
    return outs, [q._replace(root=outs[0], root_axes=q.axes, steps=(),
                             dtype=jnp.dtype(outs[0].dtype))]


# --------------------------------------------------------------------------------------------
# Higher-order primitives


def _inline_closed(closed, invals, intags, state, scope):
    return _eval(closed.jaxpr, closed.consts, invals, intags, state, scope)


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _jit(eqn, invals, intags, state, scope):
    """A nested ``jit``, inlined; its ``in_shardings``/``out_shardings`` stay as sharding
    constraints on its inputs and outputs (views pass through them)."""
    parts = compat.jit_parts(eqn)

    def constrained(vals, tags, shardings):
        out_v, out_t = [], []
        for v, t, s in zip(vals, tags, shardings):
            c = _constrain(v, s)
            if t is not None and s is not None:
                t = _derive(state, t, t.axes, None, lambda x, s=s: _constrain(x, s), _same)
            out_v.append(c)
            out_t.append(t)
        return out_v, out_t
    invals, intags = constrained(invals, intags, parts.in_shardings)
    outs, tags = _inline_closed(parts.jaxpr, invals, intags, state, scope)
    return constrained(outs, tags, parts.out_shardings)


def _call(eqn, invals, intags, state, scope):
    return _inline_closed(compat.jit_parts(eqn).jaxpr, invals, intags, state, scope)


def _custom(eqn, invals, intags, state, scope):
    """A ``custom_jvp``/``custom_vjp`` function. Its rule is kept: edited weights entering it are
    substituted whole and it is bound as written, unless its primal declares the rule autodiff's
    own (:func:`same_derivative`); then it is inlined. The probe always looks inside (the
    contractions there shape the factors)."""
    closed = compat.custom_primal(eqn)
    names = state.names_of(eqn)
    if state.inlines(eqn):
        return _inline_closed(closed, invals, intags, state, scope)
    what = f"{eqn.primitive.name} function"
    if state.record:
        _note_other(state, intags, eqn.primitive.name)
        return _inline_closed(closed, invals, intags, state, scope)
    edited = [k for k in names if k in state.mark_edits or k in state.taps]
    if edited:
        raise ValueError(
            f"{state.what}: mark {marks_lib.key_str(edited[0])} is inside a {what}; editing it "
            f"there would drop the function's own derivative rule. Move the mark outside the "
            f"function, or, if its rule is autodiff's own derivative of its primal, declare so "
            f"with jpeft.same_derivative(value) in the primal")
    return compat.bind(eqn, _edited_inputs(eqn, invals, intags, state, scope,
                                           eqn.primitive.name)), [None] * len(eqn.outvars)


def _remat(eqn, invals, intags, state, scope):
    parts = compat.remat_parts(eqn)

    heads = []

    def body(*xs):
        inner = scope.body()
        outs = _eval(parts.jaxpr.jaxpr, parts.jaxpr.consts, xs, intags, state, inner)[0]
        heads[:] = [_heads([o], state) for o in outs] if state.record else []
        return outs, inner.taps
    outs, taps = jax.checkpoint(body, prevent_cse=parts.prevent_cse, policy=parts.policy)(*invals)
    if scope.taps is not None:
        scope.taps.update(taps)
    for o, h in zip(outs, heads):          # output heads stay heads through a remat region
        if h:
            state.heads[id(o)] = (o, h)
    return list(outs), [None] * len(outs)


def _cond(eqn, invals, intags, state, scope):
    index, ops = invals[0], invals[1:]
    if intags[0] is not None:
        index = _edited_inputs(eqn, invals[:1], intags[:1], state, scope, "cond (index)")[0]
    state.no_taps_in(eqn, "cond")
    branches = [
        (lambda *xs, br=br: _eval(br.jaxpr, br.consts, xs, intags[1:], state, scope.body())[0])
        for br in compat.cond_branches(eqn)]
    outs = jax.lax.switch(index, branches, *ops)
    return list(outs), [None] * len(outs)


def _while(eqn, invals, intags, state, scope):
    p = compat.while_parts(eqn)
    cn, bn = p.cond_nconsts, p.body_nconsts
    cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
    ctags, btags, itags = intags[:cn], intags[cn:cn + bn], intags[cn + bn:]
    init = _edited_inputs(eqn, init, itags, state, scope, "while (carry)")
    state.no_taps_in(eqn, "while loop")
    none = [None] * len(init)
    cond_fn = lambda c: _eval(p.cond.jaxpr, p.cond.consts, [*cconsts, *c], [*ctags, *none],
                              state, scope.body())[0][0]
    body_fn = lambda c: tuple(_eval(p.body.jaxpr, p.body.consts, [*bconsts, *c],
                                    [*btags, *none], state, scope.body())[0])
    outs = jax.lax.while_loop(cond_fn, body_fn, tuple(init))
    return list(outs), [None] * len(outs)


def _scan(eqn, invals, intags, state, scope):
    p = compat.scan_parts(eqn)
    nc, nk = p.num_consts, p.num_carry
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    ctags, itags, xtags = intags[:nc], intags[nc:nc + nk], intags[nc + nk:]
    init = _edited_inputs(eqn, init, itags, state, scope, "scan (carry)")
    # Scanned views lose their leading axis: each iteration's slice is a new root, and the
    # factors laid out along the view that share that axis are scanned with it.
    body_xtags, extra, extra_keys, new_factors = [], [], [], {}
    for x, t in zip(xs, xtags):
        if t is None:
            body_xtags.append(None)
            continue
        lead = t.axes[0]
        key = ("scan", state.uid())
        gone = frozenset().union(*map(cover, t.axes)) - frozenset().union(
            frozenset(), *map(cover, t.axes[1:]))
        body_xtags.append(View(t.path, t.axes[1:], None, t.axes[1:], key, (),
                               t.indexed + tuple(sorted(gone)), t.through, t.dtype))
        if t.path in state.edits:
            for name, f in t.factors(scope.factors[t.root_key]).items():
                if lead in f.axes:
                    pos = f.axes.index(lead)
                    extra.append(jnp.moveaxis(f.value, pos, 0))
                    extra_keys.append((key, name, f.axes[:pos] + f.axes[pos + 1:]))
                else:
                    new_factors.setdefault(key, {})[name] = f
            new_factors.setdefault(key, {})
    counter = jnp.arange(p.length, dtype=jnp.int32)
    body_jaxpr = p.jaxpr
    # A scan over stacked weights is a layer scan: the arrays of the mark edits inside its body
    # get one slice of their leading axis per iteration. Other scans (a decoding loop) pass
    # them whole.
    layer_scan = any(t is not None for t in xtags)
    mark_keys = [k for k in state.names_in(body_jaxpr) if k in scope.arrays] if layer_scan else []
    mark_arrays = {k: dict(scope.arrays[k]) for k in mark_keys}
    for k, arrays in mark_arrays.items():
        for kp, a in jax.tree_util.tree_leaves_with_path(arrays):
            if np.ndim(a) < 1 or np.shape(a)[0] != p.length:
                raise ValueError(
                    f"mark {marks_lib.key_str(k)} is inside a scan of length {p.length}: its "
                    f"edit's array {jax.tree_util.keystr(kp)} needs a leading axis of that "
                    f"length, got shape {np.shape(a)}")

    def body(carry, x):
        x_orig, x_extra, x_marks, i = x
        factors = {**scope.factors, **{k: dict(v) for k, v in new_factors.items()}}
        for (key, name, axes), val in zip(extra_keys, x_extra):
            factors[key][name] = Factor(val, axes)
        tags = [None if t is None else t._replace(root=v) for t, v in zip(body_xtags, x_orig)]
        inner = scope.body(factors=factors, index=scope.index + (i,),
                           arrays={**scope.arrays, **x_marks},
                           lengths=scope.lengths + ((p.length,) if layer_scan else ()))
        outs, _ = _eval(body_jaxpr.jaxpr, body_jaxpr.consts, [*consts, *carry, *x_orig],
                        [*ctags, *([None] * nk), *tags], state, inner)
        return outs[:nk], (outs[nk:], inner.taps)

    carry, (ys, taps) = jax.lax.scan(body, list(init), (list(xs), extra, mark_arrays, counter),
                                     length=p.length, reverse=p.reverse, unroll=p.unroll)
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
    """A ``checkpoint_name``: record the mark, apply its edit, make it visible to later marks; a
    value named as a weight (:func:`weight`) becomes a view of that weight."""
    name = compat.name_of(eqn)
    key = marks_lib.parse(name)
    if state.record or not name.startswith(marks_lib.PREFIX) or key in state.taps:
        out = compat.bind(eqn, invals)[0]
    else:        # jpeft's own marks are identities it placed itself: not re-emitted in a call
        out = invals[0]
    if key[1] == SAME_DERIVATIVE_KIND:
        return [out], list(intags)
    if key[1] == WEIGHT_KIND:
        return [out], [_named_weight(key[0], out, state, scope)]
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


def _named_weight(path: Path, value, state: _State, scope: _Scope) -> View:
    if scope.lengths:
        raise ValueError(f"jpeft.weight({paths_lib.path_str(path)!r}) is inside a layer scan: "
                         f"name the whole stacked weight outside the scan")
    axes = tuple(range(np.ndim(value)))
    return View(tuple(path), axes, value, axes, tuple(path), dtype=value.dtype)


# --------------------------------------------------------------------------------------------
# Contractions


def _record_and_edit(eqn, invals, intags, state, scope, kind, w_pos, x_pos, contract, batch,
                     operands=()):
    view = intags[w_pos]
    c = frozenset().union(*(cover(view.axes[i]) for i in contract))
    b = frozenset().union(*(cover(view.axes[i]) for i in batch))
    f = frozenset().union(*(cover(a) for i, a in enumerate(view.axes)
                            if i not in contract and i not in batch))
    clash = (c & b) | (c & f) | (b & f)
    if clash:
        state.conflicts[view.path] = (
            f"the layout operations before its {kind} ({', '.join(sorted(view.through))}) mix "
            f"weight axes {sorted(clash)} into both contracted and output axes")
        return _other_use(eqn, invals, intags, state, scope)
    state.uses.setdefault(view.path, []).append(
        _Use(kind, b | frozenset(view.indexed), c, f, tuple(view.indexed), view.through,
             str(jnp.dtype(view.dtype))))
    edit = state.edits.get(view.path)
    if edit is None:
        return compat.bind(eqn, invals), [None]
    if jnp.issubdtype(view.dtype, jnp.integer):
        raise ValueError(
            f"{state.what}: {paths_lib.path_str(view.path)} is an {jnp.dtype(view.dtype).name} "
            f"weight contracted as it is (x @ q, scaled afterwards?): an edit there would act on "
            f"the integer codes, not on the dequantized weight. Dequantize before the product "
            f"(x @ (q.astype(f) * scale)), name the dequantized weight with jpeft.weight(value, "
            f"path), or quantize with jpeft.quantize_params")
    if not (edit.views or view.plain):
        vals = list(invals)
        vals[w_pos] = _substitute(view, f"{kind} (through {', '.join(sorted(view.through))})",
                                  state, scope)
        return compat.bind(eqn, vals), [None]
    y = compat.bind(eqn, invals)[0]
    state.reached.add(view.path)
    rng = _fold(state.rng, paths_lib.path_str(view.path), scope.index)
    call = sites_lib.ContractionCall(kind, invals[x_pos], y, view.axes, w_pos == 0,
                                     dict(eqn.params), scope.index, rng, tuple(operands))
    out = edit.fn(call, view.factors(scope.factors[view.root_key]))
    if out.shape != y.shape:
        raise ValueError(f"edit of {paths_lib.path_str(view.path)} returned shape {out.shape} for "
                         f"an output of shape {y.shape}")
    return [out.astype(y.dtype)], [None]


def _as_activations(eqn, invals, intags, state, scope):
    """For a product of two views where exactly one holds rows looked up from its weight (an
    embedding ``E[ids]`` against a projection): that one is the activations (a use of its
    weight by the lookup, edited weight substituted); ``None`` when neither or both are."""
    looked_up = [t is not None and "gather" in t.through for t in intags]
    if sum(looked_up) != 1 or any(t is None for t in intags):
        return None
    i = looked_up.index(True)
    vals, tags = list(invals), list(intags)
    vals[i] = _edited_inputs(eqn, vals[i:i + 1], tags[i:i + 1], state, scope, "gather")[0]
    tags[i] = None
    return vals, tags


def _dot_general(eqn, invals, intags, state, scope):
    if all(t is not None for t in intags):
        split = _as_activations(eqn, invals, intags, state, scope)
        if split is None:                            # both operands are weights: not a site
            return _other_use(eqn, invals, intags, state, scope)
        invals, intags = split
    lt, rt = intags
    (lc, rc), (lb, rb) = compat.dot_dims(eqn.params)
    if rt is not None:
        return _record_and_edit(eqn, invals, intags, state, scope, "dot", 1, 0, rc, rb)
    return _record_and_edit(eqn, invals, intags, state, scope, "dot", 0, 1, lc, lb)


def _conv(eqn, invals, intags, state, scope):
    if all(t is not None for t in intags):
        invals, intags = _as_activations(eqn, invals, intags, state, scope) or (invals, intags)
    if intags[0] is not None or intags[1] is None:
        return _other_use(eqn, invals, intags, state, scope)
    d = compat.conv_dims(eqn.params)
    return _record_and_edit(eqn, invals, intags, state, scope, "conv", 1, 0,
                            (d.kernel_in,) + d.kernel_spatial, ())


def _ragged(eqn, invals, intags, state, scope):
    d = compat.ragged_dims(eqn.params)
    if d is None or intags[0] is not None or intags[1] is None or intags[2] is not None:
        return _other_use(eqn, invals, intags, state, scope)
    return _record_and_edit(eqn, invals, intags, state, scope, "ragged", 1, 0, (d.contract,),
                            (d.group,), operands=(invals[2],))


_RULES: dict[str, Callable] = {
    "transpose": _transpose, "reshape": _reshape, "squeeze": _squeeze,
    "broadcast_in_dim": _broadcast, "slice": _slice, "split": _split, "rev": _rev,
    "dynamic_slice": _dynamic_slice, "gather": _gather, "mul": _mul,
    "jit": _jit, "call": _call, "custom_jvp": _custom, "custom_vjp": _custom,
    "remat": _remat, "cond": _cond, "while": _while, "scan": _scan,
    "dot_general": _dot_general, "conv_general_dilated": _conv,
    "ragged_dot_general": _ragged,
    **{name: _identity for name in compat.IDENTITIES},
}


# --------------------------------------------------------------------------------------------
# Entry points


def _run(fn, params, args, kwargs, state: _State):
    closed, out_tree, dyn, n_params, param_paths = _trace(fn, params, args, kwargs)
    tags = [View(p, tuple(range(np.ndim(x))), x, tuple(range(np.ndim(x))), p,
                 dtype=jnp.dtype(x.dtype)) for p, x in zip(param_paths, dyn[:n_params])]
    tags += [None] * (len(dyn) - n_params)
    factors = {p: dict(e.factors) for p, e in state.edits.items()}
    arrays = {k: dict(e.arrays) for k, e in state.mark_edits.items()}
    top = _Scope(factors, (), arrays, (), {}, {})
    outs, _ = _eval(closed.jaxpr, closed.consts, dyn, tags, state, top)
    state.tapped = top.taps
    if state.record:
        state.output_heads = _heads(outs, state)
    return jax.tree_util.tree_unflatten(out_tree, outs)


def call(fn: Callable[..., Any], params: Any, args: tuple, kwargs: dict, *,
         edits: Mapping[Path, sites_lib.ContractionEdit],
         marks: Mapping[tuple, sites_lib.MarkEdit] | None = None, rng: Any = None,
         what: str = "wrap", taps: Any = None) -> Any:
    """``fn(params, *args, **kwargs)`` with ``edits`` applied at the contractions of their
    weights and ``marks`` at the marked activations. With ``taps`` (mark keys), returns
    ``(output, {key: value})``: each tapped mark's value as it arrives there (edits upstream
    applied, its own not yet), stacked along a leading axis per enclosing ``scan`` (e.g.
    ``[L, ...]`` for a layer stack); a mark inside ``cond``/``while`` cannot be tapped.

    Raises:
      ValueError: an edited weight that the forward pass never uses; one used where the edit
        cannot follow it by a method that cannot form the edited weight; an edited mark the pass
        never meets or cannot edit (inside a custom-derivative function or a call jpeft does not
        enter).
    """
    state = _State(edits, record=False, rng=rng, marks=marks, taps=frozenset(taps or ()),
                   what=what)
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
            f"{what}: {len(missed)} adapted weights are never used in this forward pass: "
            f"{[paths_lib.path_str(p) for p in missed[:5]]} (was the model probed with inputs "
            f"that take another path, e.g. another shape or flag? probe with the inputs of "
            f"this call)")
    return out


def probe(fn: Callable[..., Any], params: Any, args: tuple, kwargs: dict) -> sites_lib.Sites:
    """The :class:`~jpeft.core.sites.Sites` of ``fn(params, *args, **kwargs)`` (abstract)."""
    state = _State(None, record=True, rng=None, what="probe")
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
    contractions, conflicts = {}, dict(state.conflicts)
    for path, uses in state.uses.items():
        if path in conflicts:
            continue
        layouts = {(u.kind, u.stack, u.contract, u.free, u.scanned) for u in uses}
        if len(layouts) > 1:
            conflicts[path] = "; ".join(
                f"{k}: stack {sorted(s)} contract {sorted(c)} free {sorted(f)}"
                for k, s, c, f, _ in sorted(layouts, key=str))
            continue
        kind, s, c, f, scanned = layouts.pop()
        through = frozenset().union(*(u.through for u in uses))
        contractions[path] = sites_lib.Contraction(
            kind, tuple(sorted(s)), tuple(sorted(c)), tuple(sorted(f)), len(uses),
            tuple(sorted(state.other.get(path, ()))), scanned, tuple(sorted(through)),
            uses[0].dtype, path in state.output_heads)
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
