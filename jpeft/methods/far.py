"""FAR, Freeze And Reconfigure (Vucetic et al., 2022, "Efficient Fine-Tuning of BERT Models on the
Edge", arXiv 2205.01541): train a few chosen output units of the feed-forward matrices.

For a feed-forward weight ``W0: [in, out]`` (Flax layout, ``y = x @ W0 + b0``) with kept output units
(columns) ``c = (c_1 < ... < c_k)``, FAR trains only ``W0[:, c]`` and ``b0[c]``; the other
``out - k`` columns stay frozen. Here the trained part is an *additive* change, zero at
initialisation::

    W = W0 + scatter_c(D),    b = b0 + scatter_c(d),     D: [in, k],  d: [k]

so ``W[:, c] = W0[:, c] + D`` (the paper's trainable part ``W_t``), ``W[:, j] = W0[:, j]`` for every
other column, and a zero delta is exactly the base model. Per matrix the delta holds
``k * (in + 1)`` entries (``k * in`` without a bias).

**Stage 1, choosing the columns** (:func:`far_scores`, :func:`far_magnitude_scores`,
:func:`far_select`): every output unit ``j`` of each targeted matrix gets a score,

* change (the paper): after a short warm-up fine-tune ``W0 -> W1``,
  ``s_j = sum_i |W1[i, j] - W0[i, j]| + |b1[j] - b0[j]|``;
* magnitude (the cheap alternative, no warm-up): ``s_j = sum_i |W0[i, j]| + |b0[j]|``;

and the ``k = round(fraction * out)`` columns with the highest scores are kept (per matrix), or
``round(fraction * sum out)`` over all matrices together (``budget="global"``).

**Stage 2, training** (:func:`far`): the paper computes ``concat([x @ W_t, x @ W_f])`` in the
original column order. Here the factored form (``jpeft.wrap(..., mode="factored")``, the default)
is, for every selected ``nn.Dense``::

    y = (x @ W0 + b0)  then  y[..., c] += x @ D + d          x: [..., in],  y: [..., out]

``W0`` enters only as a constant, so the backward pass forms ``dD = x^T dy[..., c]`` (``[in, k]``,
``2 N in k`` FLOPs for ``N`` tokens) and never the ``[in, out]`` gradient of the whole matrix.
This is the paper's function with the trainable columns *added to* the Dense's own output instead
of split from it: the frozen matmul stays the layer's own, so a zero delta is bit for bit the base
model, another method editing the same layer still composes, and no ``W_f = W0[:, not c]`` is
gathered nor the output permuted at every step. The price is ``x @ D`` forward and
``dy[..., c] @ D^T`` backward (``2 * 2 N in k`` FLOPs that the split avoids; on one MiniLM
intermediate matrix, ``N = 2048``, ``k = 307``: 6.30 against 5.33 GFLOP forward + backward, with
162 against 210 MB of memory traffic). ``mode="materialised"`` runs ``apply(merge(params, delta))``
instead (any apply function; the backward pass then forms the full ``[in, out]`` gradient and keeps
its ``k`` columns).

The column indices are integers and so are not part of the trainable delta (``jax.grad`` and optax
need real arrays): :func:`far` is built from a tree of indices (``far_select``'s result) that mirrors
the base tree at the kernels' paths. The stored form (:func:`far_pack`, :func:`far_unpack`) holds, per
matrix, ``{"indices": int32[k], "kernel_cols": D [in, k], "bias_cols": d [k]}`` at the Dense module's
path, and goes through :mod:`jpeft.checkpoint` as it is: restore it into
``jpeft.checkpoint.stored_like(path)`` (the template read from the checkpoint, since the column
counts are only known from the stored indices) or :func:`far_stored_like` (from known indices).

Sharding: ``D`` takes the spec of ``W0``'s input axis and replicates the column axis; ``d`` is
replicated.
"""

from __future__ import annotations

import fractions
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jpeft.core import contraction
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib
from jpeft.core import sparse as sparse_lib

#: The feed-forward matrices of a Hugging Face-named BERT: ``encoder/layer/{i}/intermediate/dense``
#: and ``encoder/layer/{i}/output/dense``, but not ``attention/output/dense`` (a regex, full match).
BERT_FFN = r".*layer/[0-9]+/(intermediate|output)/dense"


# --------------------------------------------------------------------------------------------
# Stage 1: scores and selection


def _selection(targets, kernel_names, layers_to_transform, layers_pattern, exclude):
    return paths_lib.Selection(targets=targets, leaf_names=tuple(kernel_names),
                               layers_to_transform=layers_to_transform,
                               layers_pattern=layers_pattern, exclude=exclude, ndim=2)


def _column_scores(flat: dict, kernel_paths: list, value_of, bias_name: str, include_bias: bool,
                   normalize: bool) -> dict:
    """``{kernel path: s [out]}`` with ``s_j = sum_i |V[i, j]| (+ |v_b[j]|)`` (``/ entries`` when
    ``normalize``); ``value_of(path)`` gives the matrix (or bias) whose magnitudes are summed."""
    out = {}
    for path in kernel_paths:
        v = jnp.abs(jnp.asarray(value_of(path), jnp.float32))
        s = jnp.sum(v, axis=0)
        entries = v.shape[0]
        bias_path = path[:-1] + (bias_name,)
        if include_bias and bias_path in flat:
            s = s + jnp.abs(jnp.asarray(value_of(bias_path), jnp.float32))
            entries += 1
        out[path] = s / entries if normalize else s
    return out


def far_scores(params: Any, warm: Any, targets: paths_lib.Targets = BERT_FFN, *,
               warm_is_delta: bool = False, include_bias: bool = True, normalize: bool = False,
               kernel_names: Sequence[str] = ("kernel",), bias_name: str = "bias",
               layers_to_transform: int | Sequence[int] | None = None,
               layers_pattern: str | None = None, exclude: paths_lib.Targets = ()) -> dict:
    """The paper's importance of each output unit: its L1 change over a warm-up fine-tune.

    For each targeted kernel ``W0: [in, out]`` (bias ``b0: [out]``) and its warmed-up value ``W1``::

        s_j = sum_i |W1[i, j] - W0[i, j]| + |b1[j] - b0[j]|            s: float32 [out]

    Args:
      params: the base tree.
      warm: the warmed-up tree (same structure as ``params``), or, with ``warm_is_delta``, the change
        ``W1 - W0`` as an additive delta at the weights' paths (the delta of
        ``jpeft.full_finetune(targets)``; leaves it lacks count as unchanged only for biases).
      targets: the matrices to score (default: BERT's feed-forward matrices, :data:`BERT_FFN`).
      include_bias: add the bias entry's change to its column's score.
      normalize: divide by the entries per column (``in``, plus one with the bias), a mean absolute
        change that compares matrices of different fan-in (useful for ``budget="global"``).
      kernel_names, bias_name, layers_to_transform, layers_pattern, exclude: the selection.

    Returns:
      ``{kernel path: s}`` as a nested dict mirroring ``params`` (the input of :func:`far_select`).

    Raises:
      ValueError: nothing matches ``targets``, or ``warm`` lacks a targeted kernel.
    """
    sel = _selection(targets, kernel_names, layers_to_transform, layers_pattern, exclude)
    kernels = paths_lib.select(params, sel, what="far_scores")
    flat, flat_w = paths_lib.flatten(params), paths_lib.flatten(warm)
    missing = [paths_lib.path_str(p) for p in kernels if p not in flat_w]
    if missing:
        raise ValueError(f"far_scores: the warm-up tree has no entry for {len(missing)} targeted "
                         f"kernels, e.g. {missing[:3]}")
    for p in kernels:
        if tuple(np.shape(flat_w[p])) != tuple(np.shape(flat[p])):
            raise ValueError(f"far_scores: warm-up {paths_lib.path_str(p)} has shape "
                             f"{tuple(np.shape(flat_w[p]))}, the base {tuple(np.shape(flat[p]))}")

    def change(path):
        if path not in flat_w:              # a bias the warm-up did not train
            return jnp.zeros_like(flat[path])
        w = jnp.asarray(flat_w[path], jnp.float32)
        return w if warm_is_delta else w - jnp.asarray(flat[path], jnp.float32)

    return paths_lib.unflatten(_column_scores(flat, kernels, change, bias_name, include_bias,
                                              normalize))


def far_magnitude_scores(params: Any, targets: paths_lib.Targets = BERT_FFN, *,
                         include_bias: bool = True, normalize: bool = False,
                         kernel_names: Sequence[str] = ("kernel",), bias_name: str = "bias",
                         layers_to_transform: int | Sequence[int] | None = None,
                         layers_pattern: str | None = None,
                         exclude: paths_lib.Targets = ()) -> dict:
    """The cheap alternative to :func:`far_scores` (no warm-up): the L1 norm of each column,
    ``s_j = sum_i |W0[i, j]| + |b0[j]|`` (float32 ``[out]``). Arguments as in :func:`far_scores`."""
    sel = _selection(targets, kernel_names, layers_to_transform, layers_pattern, exclude)
    kernels = paths_lib.select(params, sel, what="far_magnitude_scores")
    flat = paths_lib.flatten(params)
    return paths_lib.unflatten(_column_scores(flat, kernels, lambda p: flat[p], bias_name,
                                              include_bias, normalize))


def _check_fraction(fraction: Any) -> fractions.Fraction:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)):
        raise ValueError(f"far: fraction must be a number in (0, 1], got {fraction!r}")
    f = float(fraction)
    if not (math.isfinite(f) and 0.0 < f <= 1.0):
        raise ValueError(f"far: fraction must be in (0, 1], got {fraction!r}")
    # The decimal as written (0.15, not 0.1499999...), so that round(0.15 * 10) is 2 as on paper.
    return fractions.Fraction(repr(f))


def kept_count(fraction: float, n: int) -> int:
    """``k = round(fraction * n)``, halves rounded up, ``fraction`` taken as the decimal written
    (``kept_count(0.15, 10) == 2``). ``k / n`` equals ``fraction`` whenever ``fraction * n`` is an
    integer; otherwise it is the nearest achievable density."""
    exact = _check_fraction(fraction) * n
    return int(math.floor(exact + fractions.Fraction(1, 2)))


def far_select(scores: Any, fraction: float, *, budget: str = "per_matrix") -> dict:
    """The kept columns: for each matrix, the indices of its highest-scoring output units.

    Rule (exact and documented, so the reported density is what was asked):

    * ``budget="per_matrix"``: each matrix with ``out`` columns keeps
      ``k = round(fraction * out)`` (halves up, see :func:`kept_count`), so the kept fraction of
      every matrix is ``fraction`` whenever ``fraction * out`` is an integer;
    * ``budget="global"``: ``round(fraction * sum out)`` columns over all matrices together, ranked
      by score across matrices (scores must then be comparable: see ``normalize`` in
      :func:`far_scores`); a matrix that gets no column is left out of the result.

    Ties go to the lower column index (and, globally, to the matrix first in tree order).

    Args:
      scores: ``{kernel path: s [out]}`` (e.g. from :func:`far_scores`), any nested dict of 1-D
        arrays.
      fraction: the share of columns to keep, in ``(0, 1]``.
      budget: ``"per_matrix"`` or ``"global"``.

    Returns:
      A tree like ``scores`` of sorted ``np.int32`` index arrays ``[k]`` (the input of :func:`far`).

    Raises:
      ValueError: ``fraction`` outside ``(0, 1]``; a fraction that keeps no column of some matrix
        (per matrix) or of any (global); scores that are not 1-D or not finite.
    """
    _check_fraction(fraction)
    if budget not in ("per_matrix", "global"):
        raise ValueError(f"far_select: budget must be 'per_matrix' or 'global', got {budget!r}")
    flat = {p: np.asarray(s) for p, s in paths_lib.flatten(scores).items()}
    if not flat:
        raise ValueError("far_select: no scores given")
    for p, s in flat.items():
        if s.ndim != 1 or s.size == 0:
            raise ValueError(f"far_select: scores of {paths_lib.path_str(p)} must be a non-empty "
                             f"1-D array (one per output column), got shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"far_select: scores of {paths_lib.path_str(p)} are not all finite")

    def top(s, k):      # stable sort on -s: ties keep the lower index first
        return np.sort(np.argsort(-s.astype(np.float64), kind="stable")[:k]).astype(np.int32)

    if budget == "per_matrix":
        out = {}
        for p, s in flat.items():
            k = kept_count(fraction, s.size)
            if k == 0:
                raise ValueError(
                    f"far_select: fraction {fraction} keeps no column of {paths_lib.path_str(p)} "
                    f"({s.size} columns; round({fraction} * {s.size}) = 0). Use a fraction of at "
                    f"least {1 / (2 * s.size):.3g} for this matrix, or budget='global'.")
            out[p] = top(s, k)
        return paths_lib.unflatten(out)

    total = sum(s.size for s in flat.values())
    k = kept_count(fraction, total)
    if k == 0:
        raise ValueError(f"far_select: fraction {fraction} keeps no column of the {total} columns "
                         f"in all ({len(flat)} matrices); round({fraction} * {total}) = 0")
    owner = np.concatenate([np.full(s.size, i) for i, s in enumerate(flat.values())])
    column = np.concatenate([np.arange(s.size) for s in flat.values()])
    chosen = np.argsort(-np.concatenate(list(flat.values())).astype(np.float64), kind="stable")[:k]
    out = {}
    for i, p in enumerate(flat):
        cols = np.sort(column[chosen[owner[chosen] == i]]).astype(np.int32)
        if cols.size:
            out[p] = cols
    return paths_lib.unflatten(out)


# --------------------------------------------------------------------------------------------
# Counting


class FarReport(NamedTuple):
    """What FAR trains of the targeted matrices.

    ``trainable = sum_m k_m * (in_m + 1)`` (kept kernel columns and their bias entries; ``+ 0`` for a
    matrix without bias), ``targeted = sum_m out_m * (in_m + 1)`` (the whole targeted matrices and
    biases); ``column_density = columns_kept / columns_total`` and ``param_density = trainable /
    targeted``. Both equal the ``fraction`` given to :func:`far_select` when ``fraction * out`` is an
    integer for every matrix; otherwise they follow from the rounded counts (:func:`kept_count`).
    """
    matrices: int
    columns_kept: int
    columns_total: int
    trainable: int
    targeted: int

    @property
    def column_density(self) -> float:
        return self.columns_kept / self.columns_total

    @property
    def param_density(self) -> float:
        return self.trainable / self.targeted

    def __str__(self) -> str:
        return (f"FAR: {self.matrices} matrices, {self.columns_kept:,} of {self.columns_total:,} "
                f"output columns kept (column density {self.column_density:.6f}); trainable "
                f"{self.trainable:,} of {self.targeted:,} targeted parameters "
                f"(density {self.param_density:.6f})")


def far_report(params: Any, columns: Any, *, train_bias: bool = True,
               bias_name: str = "bias") -> FarReport:
    """Counts for ``far(columns)`` on ``params`` (the trainable count equals
    ``jpeft.num_params(delta)``)."""
    flat = paths_lib.flatten(params)
    kept = total = trainable = targeted = 0
    cols = _check_columns(columns)
    for path, c in cols.items():
        d_in, d_out = _kernel_shape(flat, path)
        has_bias = train_bias and path[:-1] + (bias_name,) in flat
        kept += c.size
        total += d_out
        trainable += c.size * (d_in + has_bias)
        targeted += d_out * (d_in + has_bias)
    return FarReport(len(cols), kept, total, trainable, targeted)


# --------------------------------------------------------------------------------------------
# Stage 2: the method


def _check_columns(columns: Any) -> dict:
    """``{kernel path: np.int32 [k]}``, each non-empty, strictly increasing and non-negative."""
    flat = paths_lib.flatten(columns)
    if not flat:
        raise ValueError("far: no columns given (an empty tree)")
    out = {}
    for p, c in flat.items():
        if isinstance(c, jax.core.Tracer):
            raise ValueError(f"far: the columns of {paths_lib.path_str(p)} must be concrete "
                             f"(they fix the delta's shapes), not a traced value")
        c = np.asarray(c)
        name = paths_lib.path_str(p)
        if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"far: the columns of {name} must be a 1-D integer array, got "
                             f"{c.dtype} {c.shape}")
        if c.size == 0:
            raise ValueError(f"far: no column kept for {name}; leave the matrix out instead")
        if c[0] < 0 or np.any(np.diff(c) <= 0):
            raise ValueError(f"far: the columns of {name} must be non-negative, sorted and "
                             f"distinct, got {c.tolist()[:10]}")
        out[p] = c.astype(np.int32)
    return out


def _kernel_shape(flat: dict, path) -> tuple[int, int]:
    if path not in flat:
        close = [paths_lib.path_str(p) for p in flat if p[-1] == path[-1]][:5]
        raise ValueError(f"far: no weight at {paths_lib.path_str(path)} in the base tree; kernels "
                         f"present include {close}")
    shape = tuple(np.shape(flat[path]))
    if len(shape) != 2:
        raise ValueError(f"far: {paths_lib.path_str(path)} has shape {shape}, not a matrix [in, out]")
    return shape


def far(columns: Any, *, train_bias: bool = True, bias_name: str = "bias",
        name: str = "far") -> method_lib.Method:
    """FAR on the matrices and output columns given by ``columns``.

    Args:
      columns: ``{kernel path: int [k]}`` mirroring the base tree (the result of
        :func:`far_select`); each array sorted, distinct, in ``[0, out)``. Host values (NumPy).
      train_bias: also train the kept columns' bias entries (``b0[c]``) where the Dense has a bias.
      bias_name: leaf name of the bias next to each kernel.
      name: the method's name and optimizer label.

    The delta mirrors the base tree: ``D: [in, k]`` at each kernel's path and ``d: [k]`` at its
    bias's path, both zero at ``init``.

    Raises:
      ValueError: (here) malformed columns; (at ``init``) a path not in the base tree, not a matrix,
        or a column index ``>= out``.
    """
    cols = _check_columns(columns)

    def check(params) -> dict:
        flat = paths_lib.flatten(params)
        for path, c in cols.items():
            _, d_out = _kernel_shape(flat, path)
            if c[-1] >= d_out:
                raise ValueError(f"far: column {int(c[-1])} is out of range for "
                                 f"{paths_lib.path_str(path)} with {d_out} columns")
        return flat

    def bias_path(path):
        return path[:-1] + (bias_name,)

    def init(key, params, sites=None):
        del key, sites
        flat = check(params)
        out = {}
        for path, c in cols.items():
            w = flat[path]
            out[path] = jnp.zeros((w.shape[0], c.size), w.dtype)
            if train_bias and bias_path(path) in flat:
                out[bias_path(path)] = jnp.zeros((c.size,), flat[bias_path(path)].dtype)
        return paths_lib.unflatten(out)

    def parts(delta) -> dict:
        """``{kernel path: (cols, D or None, d or None)}`` (``None``: not in ``delta``)."""
        flat = paths_lib.flatten(delta)
        return {p: (c, flat.get(p), flat.get(bias_path(p))) for p, c in cols.items()}

    def scatter(params, delta, sign):
        upd = {}
        for path, (c, d_w, d_b) in parts(delta).items():
            if d_w is not None:
                upd[path] = (c, d_w, 1)
            if d_b is not None:
                upd[bias_path(path)] = (c, d_b, 0)

        def one(_, w, u):
            c, d, axis = u
            idx = (slice(None), c) if axis else (c,)
            return w.at[idx].add(sign * d.astype(w.dtype), indices_are_sorted=True,
                                 unique_indices=True)
        return paths_lib.map_selected(one, params, upd)

    merge = lambda params, delta, sites=None: scatter(params, delta, 1)
    unmerge = lambda params, delta, sites=None: scatter(params, delta, -1)

    def column_edit(c):
        def fn(call, factors):
            u = contraction.dot_with(call, call.x, factors["kernel_cols"])   # [..., k]
            y = jnp.moveaxis(call.y, 0, -1) if call.weight_is_lhs else call.y
            y = y.at[..., c].add(u.astype(y.dtype), indices_are_sorted=True, unique_indices=True)
            return jnp.moveaxis(y, -1, 0) if call.weight_is_lhs else y
        return fn

    def edits(params, delta, sites, context):
        """Factored: the kept columns of each matrix contracted over its first axis are added to
        its output (``y[..., c] += x @ D``); biases and other layouts are merged."""
        if context.mode == "materialised":
            return sites_lib.Edits(merge(params, delta))
        flat_d = paths_lib.flatten(delta)
        contractions, rest = {}, {}
        for path, (c, d_w, d_b) in parts(delta).items():
            layout = None if sites is None else sites.contractions.get(path)
            if sparse_lib.is_matrix(layout):
                contractions[path] = sites_lib.ContractionEdit(
                    {"kernel_cols": sites_lib.Factor(d_w, (0, None))}, column_edit(c))
                if d_b is not None:
                    rest[bias_path(path)] = d_b
            else:
                rest[path] = d_w
                if d_b is not None:
                    rest[bias_path(path)] = d_b
        keep = {p: v for p, v in flat_d.items() if p in rest}
        return sites_lib.Edits(scatter(params, paths_lib.unflatten(keep), 1), contractions)

    def shardings(param_shardings, delta, sites=None):
        flat_s = paths_lib.flatten(param_shardings)
        kernel_of = {bias_path(p): p for p in cols}

        def one(kp, _):
            path = paths_lib.to_path(kp)
            base = flat_s[path if path in cols else kernel_of[path]]
            if not isinstance(base, NamedSharding):
                return base
            if path in cols:        # D [in, k]: W0's input-axis spec, columns replicated
                spec = tuple(base.spec) + (None,) * (2 - len(base.spec))
                return NamedSharding(base.mesh, PartitionSpec(spec[0], None))
            return NamedSharding(base.mesh, PartitionSpec())    # d [k]: replicated
        return jax.tree_util.tree_map_with_path(one, delta)

    config = {"method": "far", "train_bias": train_bias, "bias_name": bias_name,
              "columns_kept": {paths_lib.path_str(p): int(c.size) for p, c in cols.items()}}
    return method_lib.Method(
        name=name, init=init, merge=merge, unmerge=unmerge, edits=edits,
        shardings=shardings, labels=method_lib.constant_labels(name), config=config)


# --------------------------------------------------------------------------------------------
# Stored form


def _pack(cols: dict, delta: Any, bias_name: str) -> dict:
    flat = paths_lib.flatten(delta)
    out = {}
    for path, c in cols.items():
        if path not in flat:
            raise ValueError(f"far_pack: the delta has no entry at {paths_lib.path_str(path)}")
        k = np.shape(c)[0]
        if flat[path].shape[-1] != k:
            raise ValueError(f"far_pack: {paths_lib.path_str(path)} holds {flat[path].shape[-1]} "
                             f"columns but {k} indices were given")
        module = path[:-1]
        out[module + ("indices",)] = c
        out[module + ("kernel_cols",)] = flat[path]
        if module + (bias_name,) in flat:
            out[module + ("bias_cols",)] = flat[module + (bias_name,)]
    return paths_lib.unflatten(out)


def far_pack(columns: Any, delta: Any, *, bias_name: str = "bias") -> dict:
    """The stored form of a FAR delta: at each Dense module's path,
    ``{"indices": int32 [k], "kernel_cols": D [in, k], "bias_cols": d [k]}`` (``bias_cols`` only when
    trained). Everything needed to rebuild the method and its delta; save it with
    ``jpeft.checkpoint.save``. ``kernel_cols`` is the change ``W_t - W0[:, c]`` (zero-initialised), not
    ``W_t`` itself, so that restoring is exact."""
    return _pack(_check_columns(columns), delta, bias_name)


def far_unpack(stored: Any, *, kernel_name: str = "kernel", bias_name: str = "bias"
               ) -> tuple[dict, dict]:
    """``(columns, delta)`` from :func:`far_pack`'s form; ``far(columns)`` then takes ``delta``.
    The indices come back as host ``np.int32`` arrays."""
    flat = paths_lib.flatten(stored)
    columns, delta = {}, {}
    for p, v in flat.items():
        if p[-1] != "indices":
            continue
        module = p[:-1]
        if module + ("kernel_cols",) not in flat:
            raise ValueError(f"far_unpack: {paths_lib.path_str(module)} has indices but no "
                             f"kernel_cols")
        columns[module + (kernel_name,)] = np.asarray(v).astype(np.int32)
        delta[module + (kernel_name,)] = flat[module + ("kernel_cols",)]
        if module + ("bias_cols",) in flat:
            delta[module + (bias_name,)] = flat[module + ("bias_cols",)]
    if not columns:
        raise ValueError("far_unpack: no 'indices' entry found: not a FAR stored form")
    return paths_lib.unflatten(columns), paths_lib.unflatten(delta)


def far_stored_like(params: Any, columns: Any, *, train_bias: bool = True,
                    bias_name: str = "bias") -> dict:
    """The abstract stored form (``jax.ShapeDtypeStruct`` leaves) of ``far(columns)`` on
    ``params``: a template for ``jpeft.checkpoint.restore`` built from the indices (only their
    counts matter)."""
    cols = _check_columns(columns)
    method = far(columns, train_bias=train_bias, bias_name=bias_name)
    delta = jax.eval_shape(method.init, jax.random.key(0), params)
    abstract = {p: jax.ShapeDtypeStruct((c.size,), jnp.int32) for p, c in cols.items()}
    return _pack(abstract, delta, bias_name)
