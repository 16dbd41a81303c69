"""Sparse deltas: a few entries of selected base tensors, as flat indices and values.

The shared representation of the sparse selective methods (diff pruning after its magnitude
projection, FishMask, and later ones). For each adapted base leaf ``W`` (any shape, ``n = W.size``
entries) it keeps

* ``idx``: int32 ``[k]``, sorted, unique flat positions into ``W.ravel()`` (row-major), ``0 <= idx < n``;
* ``v``: ``[k]`` values with ``W``'s dtype;

and the adapted leaf is ``W' = W + scatter(idx, v)``, i.e. ``W'.ravel()[idx] = W.ravel()[idx] + v``
and every other entry unchanged.

Trainable trees must hold only floating arrays (``jax.grad`` and optax refuse integer leaves), so
the two halves live apart, both nested dicts at the base leaf's path:

* ``indices``: ``{..path..: idx}``; static, owned by the method (:func:`sparse_finetune` closes
  over it), never trained. Leaves with no kept entry are left out.
* ``values``: ``{..path..: v}``, the trainable delta.

The indices are the method's ``data``: :func:`jpeft.save` stores them next to the values and
:func:`jpeft.load` rebuilds the method; the size on disk is ``O(k)`` (``4 + itemsize`` bytes per
kept entry plus a constant per tensor), independent of the size of the model. The *stored* form
puts them side by side as one tree, ``{..path..: {"indices": idx, "values": v}}``
(:func:`to_stored`): the delta of :func:`stored_method`, which runs a sparse delta with its indices
as arguments rather than constants, so one compiled program serves many sparse deltas of the same
sizes (:func:`stored_like` gives their shapes).

Selection: :func:`top_k_indices` keeps the ``k`` largest scores over a whole pytree (one global
ranking, exact count, ties broken towards the earlier position in tree order, then in
``ravel`` order), and :func:`count_for_density` turns a density into ``k`` (the nearest whole
count).

Forward forms (:func:`sparse_finetune`, ``jpeft.wrap(..., mode=...)``):

* ``"materialised"``: ``apply(W + scatter(idx, v))``. Gradients reach only ``v`` (the scatter's
  transpose is a gather), but the backward pass still forms the full ``[in, out]`` gradient of each
  adapted matrix before gathering ``k`` entries of it.
* ``"factored"`` (default): for the weight of any ``dot`` contraction (the contraction sites of
  :func:`jpeft.probe`: Dense, DenseGeneral, Einsum and hand-written ``einsum`` projections of any
  rank and axis order, a layer-stacked ``[L, ...]`` kernel under ``scan``), with the layout's batch
  axes ``B``, contracted axes ``I`` and free axes ``O``, the input viewed as ``xt: [B * I, N]`` and,
  per entry, ``row = b * |I| + i`` and ``seg = b * |O| + o`` (its coordinates flattened over each
  group of axes)::

      y' = y + segment_sum_{seg}(xt[row] * v[:, None])      # [B * O, N], O(tokens * k)

  laid out like ``y``. For the plain matrix ``[in, out]`` this is ``rows = idx // out``,
  ``cols = idx % out``. Neither the forward nor the backward pass touches a weight-sized array; the
  gradient of ``v`` is ``sum_tokens xt[row] * dy[seg]``. A ``scan``-stacked weight sees one layer
  per iteration: its entries are grouped by layer (padded to the largest group) and the groups are
  sliced with the weight, so each iteration adds only its own layer's entries. Other leaves
  (biases, LayerNorm, embeddings, conv kernels, weights that something else also uses) are merged
  as in the materialised form.

Which is faster depends on the backend. The factored form does fewer FLOPs (MiniLM, batch 32 x 64,
0.5% of the entries: 93.6 vs 136.1 GFLOP per train step, the latter as much as full fine-tuning),
but XLA:CPU runs gathers and scatters at a small fraction of its matmul throughput, so on a CPU
the materialised form is the faster one in wall time (same set-up on a shared 2-core machine, the
factored step took 1.5 to 3 times as long over several runs): pass ``mode="materialised"`` there.
"""

from __future__ import annotations

import fractions
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib

Path = paths_lib.Path
_INT32_MAX = np.iinfo(np.int32).max


class SparseDelta(NamedTuple):
    """A sparse delta: ``indices`` (int32 ``[k]`` per path, static) and ``values`` (``[k]`` per path,
    the trainable part), both nested dicts with the same paths."""
    indices: Any
    values: Any


# ------------------------------------------------------------------------------------------------
# Counting and selecting


def count_for_density(density: float, total: int, *, what: str = "sparse") -> int:
    """``k = floor(density * total + 1/2)`` entries (the nearest count, halves up) for a density in
    ``(0, 1]``, with ``density`` taken as the decimal written (``0.15``, not ``0.1499999...``: the
    product is exact rational arithmetic on ``repr(density)``). The achieved density ``k / total`` is
    within ``1 / (2 total)`` of ``density``, and equal to it when ``density * total`` is a whole
    number.

    Raises:
      ValueError: ``density`` is not a number in ``(0, 1]``, or it keeps no entry of ``total``.
    """
    if (isinstance(density, bool) or not isinstance(density, numbers.Real)
            or not 0.0 < float(density) <= 1.0):
        raise ValueError(f"{what}: density must be a number in (0, 1], got {density!r}")
    exact = fractions.Fraction(repr(float(density))) * total
    k = int(math.floor(exact + fractions.Fraction(1, 2)))
    if k < 1:
        raise ValueError(
            f"{what}: density {density} of {total:,} entries keeps no entry "
            f"(density * total = {float(density) * total:.3g}); the smallest useful density is "
            f"1 / {total:,} = {1.0 / max(total, 1):.3g}")
    return k


def _check_k(k: Any, total: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= int(k) <= total:
        raise ValueError(f"{what}: k must be an integer in [1, {total:,}] (the number of entries "
                         f"to choose from), got {k!r}")
    return int(k)


def top_k_indices(scores: Any, *, k: int | None = None, density: float | None = None,
                  what: str = "top_k") -> dict:
    """The ``k`` entries with the largest scores over the whole tree ``scores``.

    One global ranking over every entry of every leaf (exactly ``k`` are kept, never more on ties):
    an entry beats another with a larger score or, at an equal score, an earlier position in tree
    order (``jax.tree_util`` flattening order, then ``ravel`` order). Deterministic; runs on the
    host in ``O(total)`` (``np.partition``), no sort of the whole tree.

    Args:
      scores: a pytree of real arrays (e.g. a Fisher diagonal, or ``|z * w|``), mirroring the base
        leaves to select from.
      k: how many entries to keep, ``1 <= k <= total``.
      density: alternatively, ``k = floor(density * total + 1/2)`` (:func:`count_for_density`).
      what: name used in error messages.

    Returns:
      ``indices``: nested dict ``{..path..: int32 [k_leaf]}`` (sorted, unique flat positions) for the
      leaves with at least one kept entry; ``sum k_leaf == k``.

    Raises:
      ValueError: both or neither of ``k``/``density``; a bad ``k`` or ``density``; NaN scores; an
        empty tree.
    """
    flat = paths_lib.flatten(scores)
    if not flat:
        raise ValueError(f"{what}: the score tree has no leaves")
    sizes = np.array([int(np.size(x)) for x in flat.values()], np.int64)
    total = int(sizes.sum())
    if (k is None) == (density is None):
        raise ValueError(f"{what}: give exactly one of k or density (got k={k!r}, "
                         f"density={density!r})")
    k = count_for_density(density, total, what=what) if k is None else _check_k(k, total, what)
    too_big = [paths_lib.path_str(p) for p, n in zip(flat, sizes) if n - 1 > _INT32_MAX]
    if too_big:
        raise ValueError(f"{what}: int32 flat indices cannot address tensors {too_big}")
    dtype = np.float64 if any(np.dtype(x.dtype) == np.float64 for x in flat.values()) else np.float32
    allv = np.concatenate([np.asarray(x, dtype).ravel() for x in flat.values()])
    if np.isnan(allv).any():
        bad = [paths_lib.path_str(p) for p, x in flat.items() if np.isnan(np.asarray(x, dtype)).any()]
        raise ValueError(f"{what}: scores contain NaN (in {bad[:5]})")
    if k == total:
        chosen = np.arange(total, dtype=np.int64)
    else:
        threshold = np.partition(allv, total - k)[total - k]          # the k-th largest score
        above = np.flatnonzero(allv > threshold)
        ties = np.flatnonzero(allv == threshold)[: k - above.size]   # earliest positions first
        chosen = np.sort(np.concatenate([above, ties]))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    leaf_of = np.searchsorted(starts, chosen, side="right") - 1
    out: dict[Path, np.ndarray] = {}
    for i, path in enumerate(flat):
        local = chosen[leaf_of == i] - starts[i]
        if local.size:
            out[path] = local.astype(np.int32)
    return paths_lib.unflatten(out)


def num_entries(indices: Any) -> int:
    """Total number of kept entries (``sum k_leaf``)."""
    return int(sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(indices)))


def check_indices(params: Any, indices: Any, *, what: str = "sparse") -> None:
    """Raises a ``ValueError`` unless every path of ``indices`` is a leaf of ``params`` and holds a
    1-D integer array of sorted, unique positions in ``[0, size)`` (concrete indices only)."""
    flat_p = paths_lib.flatten(params)
    problems = []
    for path, idx in paths_lib.flatten(indices).items():
        name = paths_lib.path_str(path)
        if path not in flat_p:
            problems.append(f"{name}: no such leaf in the base tree")
            continue
        if np.ndim(idx) != 1 or not jnp.issubdtype(jnp.asarray(idx).dtype, jnp.integer):
            problems.append(f"{name}: indices must be a 1-D integer array, got "
                            f"{getattr(idx, 'dtype', type(idx))} {np.shape(idx)}")
            continue
        try:
            a = np.asarray(idx)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            continue                                      # traced: only the static checks apply
        size = int(np.size(flat_p[path]))
        if a.size and (a.min() < 0 or a.max() >= size):
            problems.append(f"{name}: indices must lie in [0, {size}), got [{a.min()}, {a.max()}]")
        elif a.size > 1 and not np.all(np.diff(a) > 0):
            problems.append(f"{name}: indices must be sorted and unique")
    if problems:
        raise ValueError(f"{what}: bad sparse indices:\n  " + "\n  ".join(problems[:20]))


# ------------------------------------------------------------------------------------------------
# Scatter, gather, merge


def scatter_add(w: jax.Array, idx: jax.Array, v: jax.Array, sign: float = 1.0) -> jax.Array:
    """``w`` with ``sign * v`` (``sign`` = +1 or -1) added at the flat positions ``idx``:
    ``w.ravel().at[idx].add(v)``.

    ``w``: any shape; ``idx``: int ``[k]`` sorted and unique; ``v``: ``[k]``. Returns ``w``'s shape
    and dtype. Each position is written once, so the result equals ``w + v`` entry by entry in
    ``w``'s dtype (bit for bit what numpy computes).
    """
    if sign not in (1.0, -1.0):
        raise ValueError(f"scatter_add: sign must be +1 or -1, got {sign}")
    w = jnp.asarray(w)
    v = v.astype(w.dtype) if sign > 0 else -v.astype(w.dtype)
    flat = w.reshape(-1).at[idx].add(v, indices_are_sorted=True, unique_indices=True)
    return flat.reshape(w.shape)


def gather(tree: Any, indices: Any) -> dict:
    """``{path: tree[path].ravel()[idx]}`` for every path of ``indices`` (e.g. the values of a dense
    delta at a mask)."""
    flat_t = paths_lib.flatten(tree)
    return paths_lib.unflatten({p: jnp.asarray(flat_t[p]).reshape(-1)[jnp.asarray(i)]
                                for p, i in paths_lib.flatten(indices).items()})


def _pairs(indices: Any, values: Any) -> dict[Path, tuple[Any, Any]]:
    flat_i, flat_v = paths_lib.flatten(indices), paths_lib.flatten(values)
    if set(flat_i) != set(flat_v):
        missing = sorted(paths_lib.path_str(p) for p in set(flat_i) ^ set(flat_v))
        raise ValueError(f"sparse: indices and values have different paths: {missing[:5]}")
    return {p: (flat_i[p], flat_v[p]) for p in flat_i}


def _merge_pairs(params: Any, pairs: dict[Path, tuple[Any, Any]], sign: float) -> Any:
    return paths_lib.map_selected(lambda _, w, iv: scatter_add(w, iv[0], iv[1], sign), params, pairs)


def merge(params: Any, indices: Any, values: Any) -> Any:
    """``params`` with ``W + scatter(idx, v)`` at every path of ``indices``."""
    return _merge_pairs(params, _pairs(indices, values), 1.0)


def unmerge(params: Any, indices: Any, values: Any) -> Any:
    """The inverse of :func:`merge` (``W - scatter(idx, v)``; exact up to one float rounding)."""
    return _merge_pairs(params, _pairs(indices, values), -1.0)


def densify(params: Any, indices: Any, values: Any) -> dict:
    """The dense delta ``{path: zeros_like(W) + scatter(idx, v)}`` at every path of ``indices``."""
    flat_p = paths_lib.flatten(params)
    return paths_lib.unflatten({p: scatter_add(jnp.zeros_like(flat_p[p]), i, v)
                                for p, (i, v) in _pairs(indices, values).items()})


# ------------------------------------------------------------------------------------------------
# Stored form


def to_stored(indices: Any, values: Any) -> dict:
    """``{..path..: {"indices": idx, "values": v}}``: the delta of :func:`stored_method`."""
    return paths_lib.unflatten({p + (name,): x for p, (i, v) in _pairs(indices, values).items()
                                for name, x in (("indices", i), ("values", v))})


def from_stored(stored: Any) -> SparseDelta:
    """The inverse of :func:`to_stored`: ``SparseDelta(indices, values)``."""
    flat = paths_lib.flatten(stored)
    idx = {p[:-1]: x for p, x in flat.items() if p[-1] == "indices"}
    val = {p[:-1]: x for p, x in flat.items() if p[-1] == "values"}
    odd = [paths_lib.path_str(p) for p in flat if p[-1] not in ("indices", "values")]
    if odd or set(idx) != set(val):
        unpaired = sorted(paths_lib.path_str(p) for p in set(idx) ^ set(val))
        raise ValueError(f"sparse: not a stored sparse delta (every tensor needs 'indices' and "
                         f"'values'): unexpected {odd[:5]}, unpaired {unpaired[:5]}")
    return SparseDelta(paths_lib.unflatten(idx), paths_lib.unflatten({p: val[p] for p in idx}))


def stored_like(indices: Any, params: Any) -> dict:
    """The abstract stored form (``jax.ShapeDtypeStruct`` leaves) for ``indices`` over ``params``:
    the delta shapes of :func:`stored_method` for these sizes (one compilation for all of them)."""
    flat_p = paths_lib.flatten(params)
    return paths_lib.unflatten({
        p + (name,): jax.ShapeDtypeStruct((int(np.size(i)),), dt)
        for p, i in paths_lib.flatten(indices).items()
        for name, dt in (("indices", jnp.int32), ("values", flat_p[p].dtype))})


# ------------------------------------------------------------------------------------------------
# The factored form at a dot contraction


class DotGeometry(NamedTuple):
    """Where the weight's axes sit in one ``dot_general`` call, in the stored weight's numbering.

    Attributes:
      batch: weight axes that are dot batch axes, in the order of the output's leading batch axes.
      contract: weight axes summed against the input, paired with ``x_contract``.
      free: weight axes of the output, in the order the output holds them.
      x_batch: the input's batch axes (paired with ``batch``).
      x_contract: the input's contracted axes (paired with ``contract``).
      x_free: the input's other axes, ascending (the output holds them in this order).
      weight_is_lhs: the output is ``[*batch, *free, *x_free]`` when true, else
        ``[*batch, *x_free, *free]`` (``lax.dot_general``'s output order).
    """
    batch: tuple[int, ...]
    contract: tuple[int, ...]
    free: tuple[int, ...]
    x_batch: tuple[int, ...]
    x_contract: tuple[int, ...]
    x_free: tuple[int, ...]
    weight_is_lhs: bool


def dot_geometry(call: sites_lib.ContractionCall) -> DotGeometry:
    """The :class:`DotGeometry` of a ``dot_general`` contraction call (axes a ``scan`` sliced away
    are not in it)."""
    (lc, rc), (lb, rb) = call.params["dimension_numbers"]
    wc, wb = (lc, lb) if call.weight_is_lhs else (rc, rb)
    xc, xb = (rc, rb) if call.weight_is_lhs else (lc, lb)
    w = call.weight_axes
    free = tuple(w[i] for i in range(len(w)) if i not in wc and i not in wb)
    x_free = tuple(i for i in range(call.x.ndim) if i not in xc and i not in xb)
    return DotGeometry(tuple(w[i] for i in wb), tuple(w[i] for i in wc), free, tuple(xb),
                       tuple(xc), x_free, bool(call.weight_is_lhs))


def ravel_axes(idx: Any, shape: tuple[int, ...], axes: tuple[int, ...]) -> Any:
    """For flat row-major positions ``idx`` into an array of ``shape``, the flat position of
    their coordinates on ``axes`` alone (row-major in the order of ``axes``; ``0`` for no axes).
    Integer arithmetic only, so ``idx`` may be a host array or a traced one."""
    strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]
    flat = 0
    for a in axes:
        flat = flat * int(shape[a]) + (idx // int(strides[a])) % int(shape[a])
    return flat


def _sparse_dot(call: sites_lib.ContractionCall, idx: Any, v: jax.Array,
                shape: tuple[int, ...], presorted: bool) -> jax.Array:
    """``call.y + op(x, D)`` for the sparse ``D`` with entries ``v`` at the flat positions ``idx``
    of the stored weight (``shape``), without forming ``D``.

    With the call's batch axes ``B``, contracted axes ``I`` and free axes ``O`` of the weight, the
    input viewed as ``xt: [B * I, N]`` (``N`` = the input's other axes) and, per entry ``e``,
    ``row_e = b_e * |I| + i_e`` and ``seg_e = b_e * |O| + o_e``::

        yd = segment_sum_{seg}(xt[row] * v[:, None])       [B * O, N],   O(N k)

    then laid out like ``call.y``. ``presorted``: the entries are already in ``seg`` order (else
    they are sorted here: on the host for host indices, by ``argsort`` for traced ones), so that
    every update and its transpose moves contiguous rows of ``N`` tokens.
    """
    g = dot_geometry(call)
    x = call.x
    dim = lambda axes: int(np.prod([shape[a] for a in axes], dtype=np.int64))
    n_b, n_i, n_o = dim(g.batch), dim(g.contract), dim(g.free)
    host = isinstance(idx, np.ndarray)
    if host:
        idx = idx.astype(np.int64)
    b = ravel_axes(idx, shape, g.batch)
    rows = b * n_i + ravel_axes(idx, shape, g.contract)
    segs = b * n_o + ravel_axes(idx, shape, g.free)
    if not presorted:
        perm = (np.argsort(segs, kind="stable") if host
                else jnp.argsort(segs, stable=True))
        rows, segs, v = rows[perm], segs[perm], v[perm]
    if host:
        rows, segs = rows.astype(np.int32), segs.astype(np.int32)
    xf_shape = tuple(x.shape[i] for i in g.x_free)
    xt = jnp.transpose(x, g.x_batch + g.x_contract + g.x_free).reshape(n_b * n_i, -1)
    upd = jnp.take(xt, rows, axis=0) * v.astype(x.dtype)[:, None]               # [k, N]
    yd = jax.ops.segment_sum(upd, segs, num_segments=n_b * n_o, indices_are_sorted=True)
    yd = yd.reshape(tuple(shape[a] for a in g.batch) + tuple(shape[a] for a in g.free) + xf_shape)
    if not g.weight_is_lhs:                            # [B, O, X] -> [B, X, O]
        nb, no, nx = len(g.batch), len(g.free), len(xf_shape)
        yd = jnp.transpose(yd, (*range(nb), *range(nb + no, nb + no + nx), *range(nb, nb + no)))
    return call.y + yd.astype(call.y.dtype)


def has_factored_form(layout: sites_lib.Contraction | None) -> bool:
    """Whether a sparse delta on a weight of this layout gets the factored edit: a ``dot``
    contraction of any rank and axis order (stacked under ``scan`` included) whose weight
    nothing else uses. Conv kernels and weights with other uses are merged."""
    return layout is not None and layout.kind == "dot" and not layout.other_uses


def is_matrix(layout: sites_lib.Contraction | None) -> bool:
    """A weight ``[in, out]`` contracted over axis 0 only, nothing else using it. (The factored
    sparse form now serves every dot layout, :func:`has_factored_form`; this remains for callers
    that single out plain matrices.)"""
    return (layout is not None and layout.kind == "dot" and layout.stack == ()
            and layout.contract == (0,) and layout.free == (1,) and not layout.other_uses)


def _by_layer(idx: np.ndarray, shape: tuple[int, ...], layout: sites_lib.Contraction):
    """Host entries of a ``scan``-stacked weight grouped by layer (the flat position over the
    scanned axes, ascending), each group in its natural ``seg`` order (stored batch axes, then
    stored free axes) and padded to the largest group: ``(idx, take, valid)``, each
    ``[*scanned dims, kmax]`` (``take``: position in ``v``; ``valid``: False on padding)."""
    scanned = tuple(sorted(layout.scanned))
    dims = tuple(int(shape[a]) for a in scanned)
    n_layers = int(np.prod(dims, dtype=np.int64))
    idx = idx.astype(np.int64)
    layer = ravel_axes(idx, shape, scanned)
    batch = tuple(a for a in layout.stack if a not in scanned)
    n_o = int(np.prod([shape[a] for a in layout.free], dtype=np.int64))
    seg = ravel_axes(idx, shape, batch) * n_o + ravel_axes(idx, shape, tuple(layout.free))
    order = np.lexsort((idx, seg, layer))
    counts = np.bincount(layer, minlength=n_layers)
    kmax = max(int(counts.max()), 1)
    out_i = np.zeros((n_layers, kmax), np.int32)
    out_t = np.zeros((n_layers, kmax), np.int32)
    out_v = np.zeros((n_layers, kmax), bool)
    start = 0
    for lay in range(n_layers):
        sel = order[start:start + counts[lay]]
        start += counts[lay]
        if sel.size:
            out_i[lay, :sel.size], out_t[lay, :sel.size] = idx[sel], sel
            out_i[lay, sel.size:], out_t[lay, sel.size:] = idx[sel[-1]], sel[-1]   # keeps order
            out_v[lay, :sel.size] = True
    return tuple(a.reshape(dims + (kmax,)) for a in (out_i, out_t, out_v))


def dot_edit(idx: Any, v: Any, shape: tuple[int, ...], layout: sites_lib.Contraction
             ) -> sites_lib.ContractionEdit:
    """The factored edit ``y + op(x, D)`` of a sparse ``D = scatter(idx, v)`` (any dot layout).

    * no scanned axis: the entries go to :func:`_sparse_dot` as they are;
    * a ``scan``-stacked weight with host indices: the entries are grouped by layer and padded
      (:func:`_by_layer`); the groups are factors along the scanned axes, so each iteration
      gathers and adds only its own layer's entries (``O(N k_max)`` per layer);
    * a stacked weight with traced indices (a restored stored delta under ``jit``): every
      iteration takes all entries and masks those of other layers to zero (``O(N k)`` per
      layer), the layer read from a factor ``arange`` along the scanned axes.

    The values arrive as the factor ``"values"`` (never sliced: each entry is one value).
    """
    shape = tuple(int(d) for d in shape)
    scanned = tuple(sorted(layout.scanned))
    factors = {"values": sites_lib.Factor(v, (None,))}
    host = isinstance(idx, np.ndarray)
    if not scanned:
        def edit(call, fs):
            return _sparse_dot(call, idx, fs["values"].value, shape, presorted=False)
        return sites_lib.ContractionEdit(factors, edit)

    if host:
        g_idx, g_take, g_valid = _by_layer(idx, shape, layout)
        axes = scanned + (None,)
        factors.update(idx=sites_lib.Factor(g_idx, axes), take=sites_lib.Factor(g_take, axes),
                       valid=sites_lib.Factor(g_valid, axes))

        def edit(call, fs):
            g = dot_geometry(call)
            natural = list(g.batch) == sorted(g.batch) and list(g.free) == sorted(g.free)
            val = jnp.where(fs["valid"].value, fs["values"].value[fs["take"].value], 0)
            return _sparse_dot(call, fs["idx"].value, val, shape, presorted=natural)
        return sites_lib.ContractionEdit(factors, edit)

    dims = tuple(shape[a] for a in scanned)
    factors["layer"] = sites_lib.Factor(np.arange(int(np.prod(dims)), dtype=np.int32)
                                        .reshape(dims), scanned)

    def edit(call, fs):
        mine = ravel_axes(idx, shape, scanned) == fs["layer"].value
        val = jnp.where(mine, fs["values"].value, 0)
        return _sparse_dot(call, idx, val, shape, presorted=False)
    return sites_lib.ContractionEdit(factors, edit)


def _edits(params: Any, pairs: dict[Path, tuple[Any, Any]], sites: Any,
           context: method_lib.Context) -> sites_lib.Edits:
    """Materialised: every pair merged. Factored: pairs on the weight of a dot contraction (any
    layout, :func:`has_factored_form`) become contraction edits (:func:`dot_edit`); the rest
    (biases, LayerNorm, embeddings, conv kernels, weights with other uses) are merged."""
    if context.mode == "materialised":
        return sites_lib.Edits(_merge_pairs(params, pairs, 1.0))
    flat_p = paths_lib.flatten(params)
    contractions, rest = {}, {}
    for path, (i, v) in pairs.items():
        layout = None if sites is None else sites.contractions.get(path)
        if has_factored_form(layout):
            contractions[path] = dot_edit(i, v, np.shape(flat_p[path]), layout)
        else:
            rest[path] = (i, v)
    params = _merge_pairs(params, rest, 1.0) if rest else params
    return sites_lib.Edits(params, contractions)


# ------------------------------------------------------------------------------------------------
# Methods


def _replicated_like(param_shardings: Any, delta: Any, depth: int) -> Any:
    """Every delta leaf replicated on the mesh of the base leaf ``depth`` levels up its path."""
    flat_s = paths_lib.flatten(param_shardings)

    def one(kp, _):
        path = paths_lib.to_path(kp)
        base = flat_s[path[:len(path) - depth]]
        if isinstance(base, NamedSharding):
            return NamedSharding(base.mesh, PartitionSpec())
        return base
    return jax.tree_util.tree_map_with_path(one, delta)


def sparse_finetune(indices: Any, *, name: str = "sparse") -> method_lib.Method:
    """Train only the entries ``indices`` of the base tensors; the delta is the values tree.

    ``W' = W + scatter(idx, v)`` per path of ``indices`` (see the module docstring for the two
    forward forms); ``v`` starts at zero, so training starts exactly at the base model. The
    trainable count is ``sum k_leaf`` (:func:`num_entries`).

    Args:
      indices: ``{..path..: int [k]}`` sorted unique flat positions per base leaf (e.g. from
        :func:`top_k_indices`); kept on the host as static int32 constants.
      name: the method's name (its optimizer label).

    Raises:
      ValueError: no indices at all; a malformed index array (here), or, at ``init``, an index path
        that is not in the base tree or an index out of range.
    """
    flat_i = {p: np.asarray(i) for p, i in paths_lib.flatten(indices).items()}
    for p, i in flat_i.items():
        if i.ndim != 1 or not np.issubdtype(i.dtype, np.integer):
            raise ValueError(f"{name}: indices at {paths_lib.path_str(p)} must be a 1-D integer "
                             f"array, got {i.dtype} {i.shape}")
    flat_i = {p: i.astype(np.int32) for p, i in flat_i.items() if i.size}
    if not flat_i:
        raise ValueError(f"{name}: no entries selected (the indices tree is empty)")
    indices = paths_lib.unflatten(flat_i)

    def init(key, params, sites=None):
        del key, sites
        check_indices(params, indices, what=name)
        flat_p = paths_lib.flatten(params)
        return paths_lib.unflatten({p: jnp.zeros(i.shape, flat_p[p].dtype) for p, i in flat_i.items()})

    merge_fn = lambda params, values, sites=None: merge(params, indices, values)
    unmerge_fn = lambda params, values, sites=None: unmerge(params, indices, values)

    def edits(params, values, sites, context):
        return _edits(params, _pairs(indices, values), sites, context)

    config = {"method": "sparse", "name": name, "entries": num_entries(indices),
              "tensors": len(flat_i)}
    return method_lib.Method(
        name=name, init=init, merge=merge_fn, unmerge=unmerge_fn, edits=edits,
        shardings=lambda ps, d, sites=None: _replicated_like(ps, d, 0),
        labels=method_lib.constant_labels(name), config=config, data=indices)


def stored_method(*, name: str = "sparse") -> method_lib.Method:
    """A method whose delta is a *stored* sparse delta ``{..path..: {"indices", "values"}}``
    (:func:`to_stored`): for inference and merging with the indices as arguments (one program
    for many deltas of the same sizes), with the same forward forms as :func:`sparse_finetune`.
    Not for training (its delta holds integer arrays); ``init`` raises."""
    def init(key, params, sites=None):
        raise ValueError(f"{name}: a stored sparse delta is not initialised; build one with "
                         f"to_stored(indices, values), or train with sparse_finetune(indices)")

    def pairs(stored):
        sd = from_stored(stored)
        return _pairs(sd.indices, sd.values)

    def edits(params, stored, sites, context):
        return _edits(params, pairs(stored), sites, context)

    return method_lib.Method(
        name=name, init=init,
        merge=lambda params, stored, sites=None: _merge_pairs(params, pairs(stored), 1.0),
        unmerge=lambda params, stored, sites=None: _merge_pairs(params, pairs(stored), -1.0),
        edits=edits, shardings=lambda ps, d, sites=None: _replicated_like(ps, d, 1),
        labels=method_lib.constant_labels(name),
        config={"method": "sparse_stored", "name": name})
