"""The one interface every PEFT method implements, and the functions that use it.

A method is a :class:`Method`: a named tuple of pure functions, in the spirit of
``optax.GradientTransformation``::

    sites  = jpeft.probe(model.apply, params, *example_inputs)   # where weights meet the forward pass
    method = jpeft.lora(targets=("query", "value"), rank=8, alpha=8)
    delta  = method.init(key, params, sites)         # small trainable tree; params untouched
    f      = jpeft.wrap(model.apply, method, sites)  # f(params, delta, *args) -> outputs
    merged = method.merge(params, delta, sites)      # zero-overhead inference where the math allows

``params`` is whatever the apply function takes as its first argument (for linen, the variables
dict ``{"params": ...}``; for NNX, the parameter dict of :func:`jpeft.nnx.split`). ``delta`` is a
pytree that holds only trainable arrays; it mirrors the paths of the base weights it adapts, so
the shardings of those weights carry over to it. ``sites`` (:func:`jpeft.probe`) tells methods that
change contractions (LoRA, AdaLoRA, FAR, the sparse methods' factored form) how each weight is
contracted; methods that only transform parameters (BitFit, DID/SAID, ...) accept and ignore it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from jpeft.core import dataflow
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib
from jpeft.core import tree as tree_lib

Params = Any
Delta = Any
Sites = sites_lib.Sites | None
MODES = ("factored", "materialised")


class Context(NamedTuple):
    """How a forward pass sees the delta.

    Attributes:
      mode: ``"factored"`` (methods that have a cheaper unmerged computation use it; e.g. LoRA
        computes ``x @ W0 + s * (x @ A) @ B`` and never forms ``dW0``) or ``"materialised"`` (every
        method is folded into the parameters first: ``apply(merge(params, delta))``).
      rng: key for delta-side randomness (LoRA dropout, diff pruning's gates); ``None`` means
        deterministic (evaluation).
      inputs: per-call data for the method (``wrap``'s ``method_inputs=``), e.g. each example's
        adapter in a mixed batch (:func:`jpeft.multi.mixed_lora`); ``None`` for most methods.
    """
    mode: str = "factored"
    rng: jax.Array | None = None
    inputs: Any = None


class Method(NamedTuple):
    """A parameter-efficient fine-tuning method as pure functions over pytrees.

    Attributes:
      name: short name; the default optimizer label of the delta's leaves.
      init: ``(key, params, sites=None) -> delta``. Zero-effect at initialisation where the paper
        says so.
      merge: ``(params, delta, sites=None) -> params`` with the delta folded into the base weights
        (exact math); ``None`` for a method that cannot be merged (gated or additive modules).
      unmerge: ``(params, delta, sites=None) -> params``, the inverse of ``merge``; ``None`` when not
        invertible.
      edits: ``(params, delta, sites, context) -> Edits``: the parameters the forward pass runs
        with and the changes at contraction sites (:class:`jpeft.core.sites.Edits`).
      shardings: ``(param_shardings, delta, sites=None) -> delta_shardings``: ``param_shardings``
        is a tree like ``params`` with a ``jax.sharding.Sharding`` per leaf; ``delta`` may be
        abstract.
      labels: ``delta -> tree of str`` for ``optax.partition``.
      config: JSON-serialisable description of the hyper-parameters (saved with checkpoints).
      penalty: ``delta -> scalar`` the training loss adds (AdaLoRA's orthogonality term), or
        ``None``. :func:`jpeft.make_train_step` folds it in when given the method.
      optimizer: ``inner -> optax.GradientTransformation`` wrapping the optimizer with method-side
        state (AdaLoRA's rank allocator), or ``None``. :func:`jpeft.make_train_step` and
        :func:`jpeft.init_opt_state` fold it in when given the method.
      trainable: ``delta -> int``, the entries of ``delta`` training can change, for a method
        whose delta holds entries fixed at zero (SparseAdapter's pruned weights); ``None`` when
        every entry is trainable. :func:`jpeft.param_report` counts with it.
      data: arrays that define the method beyond its ``config`` (FAR's column indices, a sparse
        method's entry indices), ``None`` for most methods. :func:`jpeft.save` stores them next to
        the delta and :func:`jpeft.methods.from_config` ``(config, data)`` rebuilds the method.
    """
    name: str
    init: Callable[..., Delta]
    merge: Callable[..., Params] | None
    unmerge: Callable[..., Params] | None
    edits: Callable[[Params, Delta, Sites, Context], sites_lib.Edits]
    shardings: Callable[..., Any]
    labels: Callable[[Delta], Any]
    config: dict
    penalty: Callable[[Delta], Any] | None = None
    optimizer: Callable[[Any], Any] | None = None
    trainable: Callable[[Delta], int] | None = None
    data: Any = None


def merge_edits(merge: Callable[..., Params]):
    """``edits`` for methods whose forward pass is just the merged parameters."""
    def edits(params, delta, sites, context):
        del context
        return sites_lib.Edits(merge(params, delta, sites))
    return edits


def constant_labels(name: str) -> Callable[[Delta], Any]:
    return lambda delta: jax.tree_util.tree_map(lambda _: name, delta)


def require_merge(method: Method, what: str = "merge") -> Callable[..., Params]:
    """``method.merge``, or a ``ValueError`` naming the method when it cannot be merged."""
    if method.merge is None:
        raise ValueError(f"{what}: method {method.name!r} cannot be merged into the base weights "
                         f"(its change is not a change of parameters)")
    return method.merge


def _no_materialised(name: str, marks: Any) -> None:
    from jpeft.core import marks as marks_lib
    raise ValueError(
        f"mode='materialised': method {name!r} changes activations (marks "
        f"{[marks_lib.key_str(k) for k in list(marks)[:4]]}), which no weight can hold; "
        f"use mode='factored'")


def wrap(apply_fn: Callable[..., Any], method: Method, sites: Sites = None, *,
         mode: str = "factored") -> Callable[..., Any]:
    """An apply function that takes the delta:
    ``f(params, delta, *args, delta_rng=None, method_inputs=None, **kwargs)``.

    ``apply_fn(params, *args, **kwargs)`` is the model's own (linen: ``model.apply``; NNX: the
    ``apply`` of :func:`jpeft.nnx.split`; any JAX function of a parameter tree). The result is pure
    and jit-safe. ``delta_rng`` switches on the method's own randomness (LoRA dropout) for training;
    leave it ``None`` in evaluation. ``method_inputs`` is per-call data for the method
    (:attr:`Context.inputs`: a mixed batch's adapter per example). ``mode`` is described in
    :class:`Context`. ``sites`` are the
    model's contraction sites (:func:`jpeft.probe`), needed by methods that change contractions.

    Contraction edits run through the data-flow backend (:mod:`jpeft.core.dataflow`): the model is
    traced once per tree structure, abstract values and static arguments (the trace is kept, and
    shared with :func:`jpeft.probe`'s, as ``jax.jit`` keeps its own) and evaluated with the edits
    in place.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    def wrapped(params, delta, *args, delta_rng=None, method_inputs=None, **kwargs):
        edits = method.edits(params, delta, sites, Context(mode, delta_rng, method_inputs))
        if edits.marks and mode == "materialised":
            _no_materialised(method.name, edits.marks)
        if edits.inputs is not None:
            args, kwargs = edits.inputs(args, kwargs)
        if not edits.contractions and not edits.marks:
            return apply_fn(edits.params, *args, **kwargs)
        return dataflow.call(apply_fn, edits.params, args, kwargs, edits=edits.contractions,
                             marks=edits.marks, rng=delta_rng, what=method.name)

    return wrapped


def observe(apply_fn: Callable[..., Any], method: Method | None, sites: Sites,
            keys: Any) -> Callable[..., Any]:
    """Like :func:`wrap`, returning ``(output, {mark key: value})`` for the marks ``keys``
    (``(scope, kind)`` pairs, :mod:`jpeft.core.marks`): the values arriving there in the forward
    pass (the method's edits upstream applied, the mark's own not yet), stacked along a leading axis per enclosing ``scan`` (a layer
    stack gives ``[L, ...]``). ``method=None`` observes the base model; the function takes
    ``(params, delta, *args)`` either way (``delta`` ignored without a method)."""
    keys = tuple(keys)

    def observed(params, delta, *args, delta_rng=None, **kwargs):
        if method is None:
            edits = sites_lib.Edits(params)
        else:
            edits = method.edits(params, delta, sites, Context("factored", delta_rng))
        if edits.inputs is not None:
            args, kwargs = edits.inputs(args, kwargs)
        return dataflow.call(apply_fn, edits.params, args, kwargs, edits=edits.contractions,
                             marks=edits.marks, rng=delta_rng, what="observe", taps=keys)
    return observed


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


def _chain(first: sites_lib.MarkEdit, then: sites_lib.MarkEdit) -> sites_lib.MarkEdit:
    """Two parts' edits of one mark applied in order (the second sees the first's output): e.g. a
    prefix and an adapter at the same attention, or a gate over a sublayer's adapted output."""
    names = ("first", "then")

    def fn(call, arrays):
        v = first.fn(call, arrays["first"])
        return then.fn(call._replace(value=v), arrays["then"])
    return sites_lib.MarkEdit(dict(zip(names, (first.arrays, then.arrays))), fn)


def _chain_contraction(first: sites_lib.ContractionEdit, then: sites_lib.ContractionEdit
                       ) -> sites_lib.ContractionEdit:
    """Two parts' edits of one weight's contractions applied in order (the second sees the first's
    output as ``call.y``): for additive edits such as LoRA's, their changes add up."""
    factors = {**{f"0:{k}": f for k, f in first.factors.items()},
               **{f"1:{k}": f for k, f in then.factors.items()}}

    part = lambda fs, i: {k[2:]: v for k, v in fs.items() if k.startswith(f"{i}:")}

    def fn(call, fs):
        y = first.fn(call, part(fs, 0))
        return then.fn(call._replace(y=y), part(fs, 1))

    def weight(w, fs, axes):
        return then.weight(first.weight(w, part(fs, 0), axes), part(fs, 1), axes)
    both = first.weight is not None and then.weight is not None
    return sites_lib.ContractionEdit(factors, fn, weight if both else None,
                                     first.views and then.views)


def compose(**methods: Method) -> Method:
    """Several methods applied together, in the order given; the delta is ``{name: delta_i}``.

    ``jpeft.compose(lora=jpeft.lora(...), bitfit=jpeft.bitfit())`` trains both deltas; each part is
    labelled by its name for ``optax.partition``, so each can get its own optimizer. Parts that
    edit contractions are applied at the contractions; parts that change parameters change the
    parameters the model runs with. The composition merges only when every part does. Two parts
    may not adapt the same weight (one weight trained twice); for several adapters active at once
    on the same weights use :func:`active`.
    """
    return _compose(methods, shared=False)


def active(**adapters: Method) -> Method:
    """Several adapters active at once on one base, as Hugging Face PEFT's multiple active
    adapters: like :func:`compose`, but parts may adapt the same weights; their edits apply in
    order, each seeing the output of the previous, so additive changes (LoRA's ``s x A B``, IA3's
    scalings, adapters) add up: ``y = W x + sum_k s_k x A_k B_k``. Merging merges each in turn."""
    return _compose(adapters, shared=True)


def _compose(methods: dict[str, Method], *, shared: bool) -> Method:
    what = "active" if shared else "compose"
    if not methods:
        raise ValueError(f"{what} needs at least one method")
    names = tuple(methods)

    def init(key, params, sites=None):
        keys = jax.random.split(key, len(names))
        delta = {n: methods[n].init(k, params, sites) for n, k in zip(names, keys)}
        if not shared:
            _check_disjoint(params, delta)
        return delta

    unmergeable = [n for n in names if methods[n].merge is None]
    not_invertible = [n for n in names if methods[n].unmerge is None]

    def merge(params, delta, sites=None):
        for n in names:
            params = methods[n].merge(params, delta[n], sites)
        return params

    def unmerge(params, delta, sites=None):
        for n in reversed(names):
            params = methods[n].unmerge(params, delta[n], sites)
        return params

    def edits(params, delta, sites, context):
        contractions: dict = {}
        marks: dict = {}
        inputs = None
        for i, n in enumerate(names):
            rng = None if context.rng is None else jax.random.fold_in(context.rng, i)
            e = methods[n].edits(params, delta[n], sites, context._replace(rng=rng))
            params = e.params
            for path, edit in e.contractions.items():
                if path in contractions and not shared:
                    raise ValueError(f"compose: two parts edit the contractions of "
                                     f"{paths_lib.path_str(path)} (several adapters on the same "
                                     f"weights: jpeft.active)")
                contractions[path] = (_chain_contraction(contractions[path], edit)
                                      if path in contractions else edit)
            if e.marks and context.mode == "materialised":
                _no_materialised(n, e.marks)
            for key, edit in e.marks.items():
                marks[key] = _chain(marks[key], edit) if key in marks else edit
            if e.inputs is not None:
                if inputs is not None:
                    raise ValueError(f"{what}: two parts change the model's inputs (the second "
                                     f"is {n!r})")
                inputs = e.inputs
        return sites_lib.Edits(params, contractions, marks, inputs)

    def shardings(param_shardings, delta, sites=None):
        return {n: methods[n].shardings(param_shardings, delta[n], sites) for n in names}

    def labels(delta):
        return {n: jax.tree_util.tree_map(lambda _, n=n: n, delta[n]) for n in names}

    penalised = [n for n in names if methods[n].penalty is not None]

    def penalty(delta):
        return sum(methods[n].penalty(delta[n]) for n in penalised)

    wrappers = [methods[n].optimizer for n in names if methods[n].optimizer is not None]

    def optimizer(inner):
        for w in wrappers:          # each wrapper acts on its own part of the tree only
            inner = w(inner)
        return inner

    counted = any(methods[n].trainable is not None for n in names)
    data = {n: methods[n].data for n in names if methods[n].data is not None}

    def trainable(delta):
        return sum(tree_lib.trainable_count(delta[n], methods[n]) for n in names)

    return Method(
        name="+".join(names), init=init, merge=None if unmergeable else merge,
        unmerge=None if not_invertible or unmergeable else unmerge, edits=edits,
        shardings=shardings, labels=labels,
        config={"active" if shared else "compose": {n: methods[n].config for n in names}},
        penalty=penalty if penalised else None, optimizer=optimizer if wrappers else None,
        trainable=trainable if counted else None, data=data or None)
