"""Sites: where a method meets the forward pass, found from the model's own data flow.

A *site* is a place in the forward pass that a method may change. The one kind every parameter
method needs is the **contraction**: a base weight ``W`` (a leaf of the parameter tree, any rank)
entering a ``lax.dot_general`` or ``lax.conv_general_dilated``. Dense, DenseGeneral, Einsum and Conv
layers, ``nnx.Linear``/``nnx.LinearGeneral``, hand-written ``jnp.einsum`` projections and a
layer-stacked ``[L, ...]`` kernel under ``scan`` all reach one.

:func:`probe` finds every contraction site by running the model *abstractly* (no FLOPs) through
the data-flow backend (:mod:`jpeft.core.dataflow`): it follows each parameter leaf from the
function's inputs, through dtype casts, transposes, nested ``jit``, ``checkpoint``/``remat``,
``scan`` (which slices a stacked weight), ``cond``/``while`` and custom-derivative functions, to
the contractions it enters. A weight is identified by where its value comes from, never by module
class, attribute name or object identity, so the same method works on Flax linen, Flax NNX and raw
JAX code.

The result, :class:`Sites`, maps each weight's path to its :class:`Contraction` layout, in the
weight's own axis numbering::

    stack     axes indexing independent slices: scanned layer axes [L, ...] and dot batch axes
    contract  axes summed against the input (a conv's spatial and input-feature axes)
    free      the output axes

e.g. a linen ``Dense`` kernel ``[in, out]`` is ``stack=(), contract=(0,), free=(1,)``; a
``DenseGeneral`` query kernel ``[in, heads, head_dim]`` is ``contract=(0,), free=(1, 2)``; an
attention output kernel ``[heads, head_dim, out]`` is ``contract=(0, 1), free=(2,)``; the same
under ``nn.scan`` gains a leading ``stack=(0,)``; a conv kernel ``[kh, kw, in, out]`` is
``contract=(0, 1, 2), free=(3,)``.

A method states what it does at a contraction with a :class:`ContractionEdit`: arrays that live
along the weight (each axis mapped to a weight axis, so ``scan`` slices them with the weight) and a
pure function of the :class:`ContractionCall` (what the op sees) and those arrays that returns the
new output. The backend applies it; the method never imports a model framework.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from jpeft.core import paths as paths_lib

Path = paths_lib.Path
Axes = tuple  # tuple[int | None, ...]: the weight axis of each array axis (None: the array's own)


class Contraction(NamedTuple):
    """How one weight meets the forward pass (axes in the weight's own numbering, sorted).

    Attributes:
      kind: ``"dot"`` (``lax.dot_general``), ``"conv"`` (``lax.conv_general_dilated``) or
        ``"ragged"`` (``lax.ragged_dot``: one weight slice per group of rows, MoE experts).
      stack: axes that index independent slices (a ``scan``-stacked layer axis, an axis indexed
        by a loop counter or a constant, dot batch axes, a ragged dot's group axis).
      contract: axes summed against the input.
      free: output axes.
      calls: how many contraction calls use the weight (per forward pass, per scan iteration).
      other_uses: the other primitives that consume the weight (e.g. ``"gather"`` for an
        embedding table that is also the tied output projection; ``"custom_vjp_call"`` for a
        weight inside a custom-derivative function): a factored edit cannot follow it there, so
        a method that can form the edited weight substitutes it at those uses (exact), and one
        that cannot refuses.
      scanned: the stacked axes indexed per layer (by ``scan``, or by an index in a loop or a
        constant), outermost first: layer axes, which ``layers_to_transform`` selects from.
      through: the layout operations other than casts and transposes that the weight passes
        through on its way to the contractions (``"reshape"``, ``"slice"``, ``"gather"``, ...);
        methods whose factors only make sense in the weight's own layout (FAR, the sparse
        methods) use their materialised form there.
      dtype: the weight's dtype as contracted (for a weight named with :func:`jpeft.weight` or
        dequantized from integers in the program: the dequantized dtype).
      head: the weight is an output head: its contraction's result reaches the model's output
        with no residual add, normalisation or other contraction in between (a classifier, a
        language-model head). ``"all-linear"`` leaves it out, as Hugging Face PEFT does.
    """
    kind: str
    stack: tuple[int, ...]
    contract: tuple[int, ...]
    free: tuple[int, ...]
    calls: int = 1
    other_uses: tuple[str, ...] = ()
    scanned: tuple[int, ...] = ()
    through: tuple[str, ...] = ()
    dtype: str | None = None
    head: bool = False

    def to_json(self) -> dict:
        return {"kind": self.kind, "stack": list(self.stack), "contract": list(self.contract),
                "free": list(self.free), "calls": self.calls, "other_uses": list(self.other_uses),
                "scanned": list(self.scanned), "through": list(self.through),
                "dtype": self.dtype, "head": self.head}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Contraction":
        return cls(d["kind"], tuple(d["stack"]), tuple(d["contract"]), tuple(d["free"]),
                   int(d.get("calls", 1)), tuple(d.get("other_uses", ())),
                   tuple(d.get("scanned", ())), tuple(d.get("through", ())), d.get("dtype"),
                   bool(d.get("head", False)))


class Mark(NamedTuple):
    """A marked activation of the forward pass (:mod:`jpeft.core.marks`).

    Attributes:
      scope: the module path the mark belongs to.
      kind: what the value is (:data:`jpeft.core.marks.KINDS`).
      shape: the value's shape at one call (per ``scan`` iteration); ``None`` when calls differ.
      dtype: its dtype name.
      scanned: lengths of the enclosing layer scans (``scan`` loops over stacked weights),
        outermost first: a method keeps one set of arrays per layer, stacked along leading axes of
        these lengths. Other loops (a decoding loop) do not count: their iterations share arrays.
      calls: how many times the forward pass (one scan iteration) reaches the mark.
    """
    scope: Path
    kind: str
    shape: tuple | None
    dtype: str
    scanned: tuple[int, ...] = ()
    calls: int = 1

    @property
    def key(self) -> tuple:
        return (self.scope, self.kind)

    def to_json(self) -> dict:
        return {"scope": list(self.scope), "kind": self.kind,
                "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype,
                "scanned": list(self.scanned), "calls": self.calls}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Mark":
        return cls(tuple(d["scope"]), d["kind"],
                   None if d.get("shape") is None else tuple(d["shape"]), d["dtype"],
                   tuple(d.get("scanned", ())), int(d.get("calls", 1)))


class Sites(NamedTuple):
    """Every site of a forward pass (:func:`probe`): contractions and marks.

    Attributes:
      contractions: ``{weight path: Contraction}`` for each parameter leaf that enters a
        contraction with one consistent layout.
      conflicts: ``{weight path: description}`` for leaves that enter contractions with different
        layouts (a method that needs one layout reports it).
      other_uses: ``{path: (primitive names)}`` for parameter leaves consumed only by other
        primitives (biases, norms, embedding lookups).
      marks: ``{(scope, kind): Mark}``, the marked activations in the order the forward pass
        meets them.
    """
    contractions: Mapping[Path, Contraction]
    conflicts: Mapping[Path, str] = {}
    other_uses: Mapping[Path, tuple[str, ...]] = {}
    marks: Mapping[tuple, Mark] = {}

    def to_json(self) -> dict:
        """A JSON-serialisable form (saved with checkpoints; :meth:`from_json` inverts it)."""
        return {"contractions": {paths_lib.path_str(p): c.to_json()
                                 for p, c in self.contractions.items()},
                "conflicts": {paths_lib.path_str(p): s for p, s in self.conflicts.items()},
                "other_uses": {paths_lib.path_str(p): list(u) for p, u in self.other_uses.items()},
                "marks": [m.to_json() for m in self.marks.values()]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Sites":
        split = lambda s: tuple(s.split("/"))
        return cls({split(p): Contraction.from_json(c) for p, c in d["contractions"].items()},
                   {split(p): s for p, s in d.get("conflicts", {}).items()},
                   {split(p): tuple(u) for p, u in d.get("other_uses", {}).items()},
                   {m.key: m for m in map(Mark.from_json, d.get("marks", []))})

    def layout(self, path: Path, *, what: str) -> Contraction:
        """The contraction layout of ``path``; a ``ValueError`` that says why there is none."""
        if path in self.contractions:
            return self.contractions[path]
        name = paths_lib.path_str(path)
        if path in self.conflicts:
            raise ValueError(f"{what}: {name} enters contractions with different layouts "
                             f"({self.conflicts[path]}); one set of factors cannot serve both")
        if path in self.other_uses:
            raise ValueError(f"{what}: {name} is never the weight of a contraction in the forward "
                             f"pass (it is used by {', '.join(self.other_uses[path])})")
        raise ValueError(f"{what}: {name} is not used by the probed forward pass (was the probe "
                         f"run with inputs that reach it?)")


class Axis(NamedTuple):
    """A derived axis of a weight as an operation sees it: ``axes`` of a :class:`ContractionCall`
    (and of the factors handed to its edit) are weight axes (``int``) where the op sees the
    weight's own axis, and an ``Axis`` where a layout operation made a new one: a reshape that
    splits or merges axes, a ``gather`` (``w[idx]``: one slice per index), a broadcast.

    Attributes:
      op: the operation that made it (``"split"``, ``"merge"``, ``"take"``, ``"broadcast"``,
        ``"expand"``).
      uid: tells apart axes made by different operations.
      cover: the weight axes whose entries it spans (empty for a broadcast axis)."""
    op: str
    uid: int
    cover: frozenset


def cover(axis: Any) -> frozenset:
    """The weight axes an axis label spans: ``{axis}`` for a weight axis, ``axis.cover`` for a
    derived :class:`Axis`, nothing for ``None`` (a factor's own axis)."""
    if axis is None:
        return frozenset()
    return axis.cover if isinstance(axis, Axis) else frozenset((axis,))


class Factor(NamedTuple):
    """An array that lives along a weight: ``axes[i]`` is the weight axis that array axis ``i``
    shares (``None`` for the array's own axes, e.g. a LoRA rank). ``scan`` slices a factor
    wherever it slices the weight, and every layout operation between the weight and its
    contraction (reshape, slice, index, gather, broadcast) is applied to it too, so at an edit its
    axes are those of the weight operand as the op sees it (:attr:`ContractionCall.weight_axes`,
    derived ones as :class:`Axis`)."""
    value: Any
    axes: Axes


class ContractionCall(NamedTuple):
    """What an edit sees at one contraction of a weight ``W``.

    Attributes:
      kind: ``"dot"``, ``"conv"`` or ``"ragged"``.
      x: the other operand (the activations).
      y: the op's output with the base weight.
      weight_axes: for each axis of the weight operand as the op sees it, the axis of the stored
        weight ``W`` (slices taken by ``scan`` or indexing are gone; transposes are undone), or an
        :class:`Axis` where a layout operation derived it (only for edits that follow views,
        :attr:`ContractionEdit.views`).
      weight_is_lhs: whether the weight is the op's first operand.
      params: the op's own parameters, read through :mod:`jpeft.core.compat`.
      index: iteration indices (int32 scalars) of the enclosing ``scan`` loops, outermost first.
      rng: the key for the edit's own randomness at this call (``None``: deterministic), already
        folded with the weight's path and ``index``.
      operands: the op's other operands (a ragged dot's group sizes).
    """
    kind: str
    x: Any
    y: Any
    weight_axes: tuple
    weight_is_lhs: bool
    params: Mapping[str, Any]
    index: tuple = ()
    rng: Any = None
    operands: tuple = ()


EditFn = Callable[[ContractionCall, Mapping[str, Factor]], Any]


class ContractionEdit(NamedTuple):
    """A method's change at the contractions of one weight.

    ``factors`` are sliced along with the weight (see :class:`Factor`); ``fn(call, factors)``
    returns the new output (the shape and dtype of ``call.y``).

    ``weight(w, factors, axes) -> w'``, where the method has one, is the edited weight itself for
    a value ``w`` of the weight whose axes are ``axes`` (weight axes, or :class:`Axis`), with
    ``factors`` laid out along the same axes: the backend substitutes it wherever the factored
    edit cannot follow the weight (its other uses, a custom-derivative function it enters), so
    the result stays exact. ``views``: ``fn`` follows any view of the weight (its math uses the
    axis labels only, as a low-rank product does); otherwise it is applied only where the op sees
    the weight through casts and transposes, and the weight is substituted elsewhere."""
    factors: Mapping[str, Factor]
    fn: EditFn
    weight: Callable[[Any, Mapping[str, Factor], tuple], Any] | None = None
    views: bool = False


class MarkCall(NamedTuple):
    """What an edit sees at one mark.

    Attributes:
      value: the marked value (after any earlier edit of the same mark by a composed part).
      scope, kind: the mark's key.
      seen: ``{(scope, kind): value}`` of the marks the pass has met before this one and can see
        here (the enclosing levels and this one, as edited), e.g. a sublayer's ``"in"`` at its
        ``"out"``.
      index: iteration indices (int32 scalars) of the enclosing ``scan`` loops, outermost first.
      rng: the key for the edit's own randomness (``None``: deterministic), folded with the mark's
        key and ``index``.
    """
    value: Any
    scope: Path
    kind: str
    seen: Mapping[tuple, Any]
    index: tuple = ()
    rng: Any = None


class MarkEdit(NamedTuple):
    """A method's change at one mark: ``fn(call, arrays) -> new value`` (the shape and dtype of
    ``call.value``). Each of ``arrays`` carries one leading axis per enclosing ``scan``
    (:attr:`Mark.scanned`), which the backend slices so each iteration sees its own."""
    arrays: Mapping[str, Any]
    fn: Callable[[MarkCall, Mapping[str, Any]], Any]


class Edits(NamedTuple):
    """What a method changes in one forward pass: ``params`` (the parameters the model runs
    with: the base, or the base with parts of the delta merged in), ``contractions``
    (``{weight path: ContractionEdit}``), ``marks`` (``{(scope, kind): MarkEdit}``) and
    ``inputs``: ``(args, kwargs) -> (args, kwargs)`` applied to the model's inputs first (prompt
    tuning lengthens the sequence), or ``None``."""
    params: Any
    contractions: Mapping[Path, ContractionEdit] = {}
    marks: Mapping[tuple, MarkEdit] = {}
    inputs: Callable[[tuple, dict], tuple[tuple, dict]] | None = None


def probe(apply_fn: Callable[..., Any], params: Any, *args, **kwargs) -> Sites:
    """The contraction sites of ``apply_fn(params, *args, **kwargs)``, found abstractly.

    ``params`` and the array arguments may be concrete arrays or ``jax.ShapeDtypeStruct``; nothing
    is computed (the function is traced once). Non-array arguments are passed through as they
    are (``deterministic=True``, a ``train`` flag, ...).
    """
    from jpeft.core import dataflow
    return dataflow.probe(apply_fn, params, args, kwargs)


class SiteSelection(NamedTuple):
    """The weights a method adapts, and those it considered and left out, with the reason.

    ``layers``: for stacked weights narrowed by ``layers_to_transform``, ``{path: (axis,
    indices)}``: only those slices along the weight's (first) scanned axis are adapted."""
    chosen: list
    skipped: Mapping[Path, str]
    layers: Mapping[Path, tuple[int, tuple[int, ...]]] = {}

    def report(self) -> str:
        lines = [f"adapted {len(self.chosen)} weights:"]
        lines += [f"  {paths_lib.path_str(p)}" for p in self.chosen]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {paths_lib.path_str(p)}: {why}" for p, why in self.skipped.items()]
        return "\n".join(lines)


def select(params: Any, sites: Sites | None, sel: paths_lib.Selection, *, what: str,
           kinds: tuple[str, ...] = ("dot",), all_weights: bool = False) -> SiteSelection:
    """The contraction weights of ``params`` chosen by ``sel`` (targets match a leaf's module path
    or its full path).

    ``all_weights=True`` (``"all-linear"``) takes, as Hugging Face PEFT does, every weight of a
    ``kinds`` contraction that ``sel`` does not exclude, except output heads (:attr:`Contraction.
    head`) and weights also read by a lookup (embeddings, tied or not); otherwise ``sel.targets``
    must name them. Leaves that match but are left out are reported in ``skipped`` with the reason
    (no contraction, a contraction of another kind, conflicting layouts, an output head, an
    embedding).

    Raises:
      ValueError: ``sites`` missing; nothing matched (with the closest existing paths); a target
        of a list that matches no leaf; a named module none of whose leaves can be adapted (saying
        why: e.g. not reached by the probed forward pass, with what to probe with instead).
    """
    if sites is None:
        raise ValueError(f"{what} needs the model's contraction sites: "
                         f"sites = jpeft.probe(apply_fn, params, *example_inputs), then "
                         f"{what}.init(key, params, sites)")
    flat = paths_lib.flatten(params)
    layers = sel.layers_to_transform
    if isinstance(layers, int):
        layers = (layers,)

    def why_not(path) -> str | None:
        c = sites.contractions.get(path)
        if c is None:
            if path in sites.conflicts:
                return f"enters contractions with different layouts ({sites.conflicts[path]})"
            uses = sites.other_uses.get(path)
            return (f"not a contraction weight (used by {', '.join(uses)})" if uses
                    else "not used by the probed forward pass (probe with inputs that reach "
                         "it: jpeft.probe(apply, params, *inputs) with the shapes and flags of "
                         "the calls that use it)")
        if c.kind not in kinds:
            return f"a {c.kind} contraction ({what} takes {'/'.join(kinds)} here; name it)"
        if c.dtype is not None and np.issubdtype(np.dtype(c.dtype), np.integer):
            return (f"an {c.dtype} weight contracted as it is (an edit would act on the integer "
                    f"codes, not on the dequantized weight): dequantize before the product, or "
                    f"name the dequantized weight with jpeft.weight(value, path)")
        if all_weights and "gather" in c.other_uses:
            return ("an embedding (also read by a lookup; all-linear takes linear layers only: "
                    "name it to adapt it)")
        if all_weights and c.head:
            return ("the output head (its contraction gives the model's output; all-linear "
                    "leaves it out as Hugging Face PEFT does: name it to adapt it, or train it "
                    "whole with jpeft.full_finetune)")
        return None

    def hit(path, targets) -> bool:
        return any(paths_lib.matches(q, targets) for q in (path[:-1], path))

    matched, chosen, skipped, sliced = [], [], {}, {}
    for path in flat:
        if sel.leaf_names is not None and path[-1] not in sel.leaf_names:
            continue
        if not (all_weights or hit(path, sel.targets)) or (sel.exclude and hit(path, sel.exclude)):
            continue
        layout = sites.contractions.get(path)
        stacked = layout is not None and layout.scanned
        if layers is not None and not stacked and (
                paths_lib.layer_index(path[:-1], sel.layers_pattern) not in layers):
            continue
        matched.append(path)
        reason = why_not(path)
        if reason is None:
            chosen.append(path)
            if layers is not None and stacked:          # index along the stacked layer axis
                axis = layout.scanned[0]
                n = flat[path].shape[axis]
                bad = [i for i in layers if not 0 <= i < n]
                if bad:
                    raise ValueError(f"{what}: layers_to_transform {bad} out of range for the "
                                     f"stacked weight {paths_lib.path_str(path)} with {n} layers "
                                     f"(axis {axis})")
                sliced[path] = (axis, tuple(sorted(set(layers))))
        elif (path in sites.contractions or path in sites.conflicts
              or "gather" in sites.other_uses.get(path, ())
              or (path not in sites.other_uses and len(getattr(flat[path], "shape", ())) >= 2)):
            skipped[path] = reason          # weights left out; not biases and norm scales
    if not chosen:
        if matched:
            detail = "; ".join(f"{paths_lib.path_str(p)}: {why_not(p)}" for p in matched[:6])
            raise ValueError(f"{what}: the targets match {len(matched)} existing leaves but none "
                             f"can be adapted: {detail}")
        paths_lib.select(params, sel._replace(targets=sel.targets), what=what)   # raises, listing
        raise ValueError(f"{what}: nothing selected")                            # the closest
    if not all_weights:
        _check_named(sel, matched, chosen, why_not, hit, what)
    return SiteSelection(chosen, skipped, sliced)


def _check_named(sel, matched, chosen, why_not, hit, what: str) -> None:
    """Named targets never drop silently: each target of a list matches some leaf, and each
    module they match has a leaf that is adapted (or only leaves that are not weights of any
    kind: biases, norms, which a module-path target matches along with its kernel)."""
    if not isinstance(sel.targets, str) and sel.targets is not None:
        unmatched = [t for t in sel.targets if not any(hit(p, [t]) for p in matched)]
        if unmatched:
            raise ValueError(f"{what}: targets {unmatched} match no leaf of the parameters "
                             f"(the others do); check their spelling against the model's "
                             f"module paths")
    modules: dict = {}
    for p in matched:
        modules.setdefault(p[:-1], []).append(p)
    chosen = set(chosen)
    for module, leaves in modules.items():
        if any(p in chosen for p in leaves):
            continue
        weights = [p for p in leaves if "not a contraction weight" not in why_not(p)]
        if weights:
            detail = "; ".join(f"{paths_lib.path_str(p)}: {why_not(p)}" for p in weights[:4])
            raise ValueError(f"{what}: the target module {paths_lib.path_str(module)} cannot be "
                             f"adapted: {detail}")


def select_marks(sites: Sites | None, targets: paths_lib.Targets, kinds: str | tuple[str, ...],
                 *, what: str, exclude: paths_lib.Targets = ()) -> list[Mark]:
    """The marks of ``sites`` of one of ``kinds`` whose scope ``targets`` matches (module-path
    targets, as for weights: a regex string or a list of path suffixes; ``None``: every scope),
    in the order the forward pass meets them.

    Raises:
      ValueError: ``sites`` missing, or nothing matched (listing the scopes that have marks of
        those kinds, or the kinds the model has when it has none of them).
    """
    if sites is None:
        raise ValueError(f"{what} needs the model's sites: sites = jpeft.probe(apply_fn, params, "
                         f"*example_inputs), then {what}.init(key, params, sites)")
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    of_kind = [m for m in sites.marks.values() if m.kind in kinds]
    found = [m for m in of_kind if paths_lib.matches(m.scope, targets)
             and not (exclude and paths_lib.matches(m.scope, exclude))]
    if found:
        return found
    if of_kind:
        scopes = sorted({paths_lib.path_str(m.scope) or "<top>" for m in of_kind})
        raise ValueError(f"{what}: no {'/'.join(kinds)} site matches {targets!r}; the model has "
                         f"them at {len(scopes)} scopes, e.g. {scopes[:8]}")
    present = sorted({m.kind for m in sites.marks.values()})
    raise ValueError(f"{what}: the model has no {'/'.join(kinds)} sites (hook points); its marked "
                     f"sites are of kinds {present}. Mark them with jpeft.core.marks.mark(x, "
                     f"module, kind) in the model, or target module inputs/outputs ('in'/'out')")


def module_mark(sites: Sites, weight_path: Path, kind: str) -> tuple | None:
    """The ``(scope, kind)`` mark of the module that holds ``weight_path``, or ``None``.

    The module's scope is the weight's path without its leaf name, and without a leading
    collection name for Flax linen (``params/bert/.../dense/kernel`` -> ``bert/.../dense``)."""
    module = tuple(weight_path[:-1])
    for scope in (module, module[1:]):
        if (scope, kind) in sites.marks:
            return (scope, kind)
    return None
