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

**Any contraction layout.** With the model's contraction sites (:func:`jpeft.probe`), a weight of
layout ``(stack S, contract I, free O)`` (:class:`jpeft.core.sites.Contraction`, axes in the
weight's own numbering) is read as ``prod(S)`` matrices ``[prod I, prod O]``: its *columns* are its
output features, one per index into the free axes flattened row-major in the weight's axis order,
separately per stack slice. A DenseGeneral query kernel ``[in, heads, head_dim]`` has
``heads * head_dim`` columns; an attention output kernel ``[heads, head_dim, out]`` has ``out``
columns of ``heads * head_dim`` entries; a Gemma-style ``[2, N, D, H]`` einsum weight contracted
over ``D`` has ``2 * N * H`` columns; a ``scan``-stacked ``[L, in, out]`` kernel is ``L`` matrices,
each with its own kept columns; a conv kernel ``[kh, kw, in, out]`` has ``out`` columns (output
channels). Then::

    columns c: int [*S, k]      D: [*S, *I, k]      d: [*S, k]   (for a bias of shape [*S, *O])

with the same ``k`` in every slice, and ``W[s, ..., col c[s, j]] += D[s, ..., j]``. Without sites a
weight must be a matrix ``[in, out]`` contracted over its first axis (the layout above with
``S = ()``, ``I = (0,)``, ``O = (1,)``); pass the same sites to the scores, :func:`far_report` and
the method's ``init``/``merge``.

**Stage 1, choosing the columns** (:func:`far_scores`, :func:`far_magnitude_scores`,
:func:`far_select`): every output unit ``j`` of each targeted matrix gets a score,

* change (the paper): after a short warm-up fine-tune ``W0 -> W1``,
  ``s_j = sum_i |W1[i, j] - W0[i, j]| + |b1[j] - b0[j]|``;
* magnitude (the cheap alternative, no warm-up): ``s_j = sum_i |W0[i, j]| + |b0[j]|``;

(``i`` running over the contracted axes, per stack slice) and the ``k = round(fraction * out)``
columns with the highest scores are kept (per matrix, i.e. per stack slice), or
``round(fraction * sum out)`` over all matrices together (``budget="global"``, unstacked weights).

**Stage 2, training** (:func:`far`): the paper computes ``concat([x @ W_t, x @ W_f])`` in the
original column order. Here the factored form (``jpeft.wrap(..., mode="factored")``, the default)
is, at every contraction of a selected weight::

    y = op(x, W0) + b0   then   y[..., c] += op(x, D) + d        (op: the layer's own contraction)

e.g. ``y[..., c] += x @ D + d`` for a Dense ``[in, out]``, ``x: [..., in]``, ``y: [..., out]``; for other
layouts ``op(x, D)`` contracts ``x`` with ``D`` over the same axes as the weight (batched over dot
batch axes; a conv with ``k`` output channels for a conv kernel) and the ``k`` results are added at
the kept positions of the output's free axes flattened. Under ``scan`` the stacked ``D`` and the
per-layer column indices are sliced with the weight, one layer per iteration.

``W0`` enters only as a constant, so the backward pass forms ``dD = x^T dy[..., c]`` (``[in, k]``,
``2 N in k`` FLOPs for ``N`` tokens) and never the ``[in, out]`` gradient of the whole matrix.
This is the paper's function with the trainable columns *added to* the layer's own output instead
of split from it: the frozen matmul stays the layer's own, so a zero delta is bit for bit the base
model, another method editing the same layer still composes, and no ``W_f = W0[:, not c]`` is
gathered nor the output permuted at every step. The price is ``x @ D`` forward and
``dy[..., c] @ D^T`` backward (``2 * 2 N in k`` FLOPs that the split avoids; on one MiniLM
intermediate matrix, ``N = 2048``, ``k = 307``: 6.30 against 5.33 GFLOP forward + backward, with
162 against 210 MB of memory traffic). ``mode="materialised"`` runs ``apply(merge(params, delta))``
instead (any apply function; the backward pass then forms the full weight gradient and keeps its
``k`` columns). A weight that the forward pass also uses outside contractions (e.g. a tied
embedding) has no factored form: the factored mode says so; use the materialised one.

The column indices are integers and so are not part of the trainable delta (``jax.grad`` and optax
need real arrays): :func:`far` is built from a tree of indices (``far_select``'s result) that mirrors
the base tree at the kernels' paths; it is the method's ``data``: :func:`jpeft.save` stores it with
the delta and :func:`jpeft.load` rebuilds the method from both.

Sharding: ``D`` takes the specs of ``W0``'s stack and contracted axes and replicates the column
axis; ``d`` takes the specs of the bias's stack axes, its column axis replicated (a matrix's
``d [k]`` is replicated).
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

#: The layout assumed without sites: a matrix ``[in, out]`` contracted over its first axis.
MATRIX = sites_lib.Contraction("dot", (), (0,), (1,))


# --------------------------------------------------------------------------------------------
# Layouts


class _Columns(NamedTuple):
    """A weight read as ``prod(S)`` matrices ``[prod I, prod O]`` (axes in the weight's order)."""
    layout: sites_lib.Contraction
    shape: tuple[int, ...]

    @property
    def stack(self) -> tuple[int, ...]:
        return tuple(sorted(self.layout.stack))

    @property
    def contract(self) -> tuple[int, ...]:
        return tuple(sorted(self.layout.contract))

    @property
    def free(self) -> tuple[int, ...]:
        return tuple(sorted(self.layout.free))

    def dims(self, axes) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in axes)

    def size(self, axes) -> int:
        return int(np.prod(self.dims(axes), dtype=np.int64))

    @property
    def n_slices(self) -> int:
        return self.size(self.stack)

    @property
    def n_in(self) -> int:
        return self.size(self.contract)

    @property
    def n_out(self) -> int:
        return self.size(self.free)

    @property
    def bias_shape(self) -> tuple[int, ...]:
        return self.dims(self.stack) + self.dims(self.free)

    def as_matrices(self, w: jax.Array) -> jax.Array:
        """``w`` (the weight's shape) as ``[prod S, prod I, prod O]``."""
        perm = self.stack + self.contract + self.free
        return jnp.transpose(w, perm).reshape(self.n_slices, self.n_in, self.n_out)

    def from_matrices(self, m: jax.Array) -> jax.Array:
        """The inverse of :meth:`as_matrices`."""
        perm = self.stack + self.contract + self.free
        m = m.reshape(tuple(self.shape[a] for a in perm))
        return jnp.transpose(m, np.argsort(perm))

    def column_sums(self, a: jax.Array) -> jax.Array:
        """``sum_I a`` laid out ``[*S, prod O]`` (``a``: the weight's shape)."""
        s = jnp.sum(a, axis=self.contract)
        rest = tuple(sorted(self.stack + self.free))
        s = jnp.transpose(s, [rest.index(x) for x in self.stack + self.free])
        return s.reshape(self.dims(self.stack) + (self.n_out,))


def _missing(flat: dict, path, what: str) -> ValueError:
    close = [paths_lib.path_str(p) for p in flat if p[-1] == path[-1]][:5]
    return ValueError(f"{what}: no weight at {paths_lib.path_str(path)} in the base tree; kernels "
                      f"present include {close}")


def _columns_of(flat: dict, path, sites, what: str = "far") -> _Columns:
    """How the weight at ``path`` splits into columns: its layout from ``sites``, or, without
    sites, a matrix ``[in, out]`` (any other rank is then an error)."""
    if path not in flat:
        raise _missing(flat, path, what)
    shape = tuple(int(d) for d in np.shape(flat[path]))
    if sites is not None:
        return _Columns(sites.layout(path, what=what), shape)
    if len(shape) != 2:
        raise ValueError(
            f"{what}: {paths_lib.path_str(path)} has shape {shape}, not a matrix [in, out]: FAR "
            f"needs its contraction layout to know its columns; pass the model's sites "
            f"(sites = jpeft.probe(apply_fn, params, *inputs))")
    return _Columns(MATRIX, shape)


def _bias_path(flat: dict, path, cols: _Columns, bias_name: str, what: str):
    """The path of the weight's bias when it exists, ``None`` otherwise; a bias whose shape is not
    ``[*S, *O]`` (one entry per column and stack slice) is an error."""
    bp = path[:-1] + (bias_name,)
    if bp not in flat:
        return None
    shape = tuple(np.shape(flat[bp]))
    if shape != cols.bias_shape:
        raise ValueError(
            f"{what}: the bias {paths_lib.path_str(bp)} has shape {shape}, but the columns of "
            f"{paths_lib.path_str(path)} {cols.shape} need one entry per stack slice and output "
            f"feature, [*S, *O] = {cols.bias_shape}; pass train_bias=False / include_bias=False "
            f"(or another bias_name)")
    return bp


# --------------------------------------------------------------------------------------------
# Stage 1: scores and selection


def _kernels(params, sites, targets, kernel_names, layers_to_transform, layers_pattern, exclude,
             what: str) -> list:
    """The targeted kernels: any rank with ``sites`` (each must have a contraction layout), else
    matrices (2-D leaves) only."""
    sel = paths_lib.Selection(targets=targets, leaf_names=tuple(kernel_names),
                              layers_to_transform=layers_to_transform,
                              layers_pattern=layers_pattern, exclude=exclude,
                              ndim=None if sites is not None else 2)
    if sites is not None and layers_to_transform is not None:
        wide = paths_lib.select(params, sel._replace(layers_to_transform=None), what=what)
        stacked = [paths_lib.path_str(p) for p in wide
                   if p in sites.contractions and sites.contractions[p].scanned]
        if stacked:
            raise ValueError(
                f"{what}: layers_to_transform picks layers by their index in the path, but "
                f"{stacked[:3]} are stacked weights (all layers in one array) whose every slice "
                f"keeps the same number of columns; leave layers_to_transform out, or target "
                f"unstacked weights")
    kernels = paths_lib.select(params, sel, what=what)
    return kernels


def _column_scores(flat: dict, kernels: list, sites, value_of, bias_name: str,
                   include_bias: bool, normalize: bool, what: str) -> dict:
    """``{kernel path: s [*S, prod O]}`` with ``s[.., j] = sum_I |V[.., j]| (+ |v_b[.., j]|)``
    (``/ entries`` when ``normalize``); ``value_of(path)`` gives the weight (or bias) whose
    magnitudes are summed."""
    out = {}
    for path in kernels:
        cols = _columns_of(flat, path, sites, what)
        s = cols.column_sums(jnp.abs(jnp.asarray(value_of(path), jnp.float32)))
        entries = cols.n_in
        bias = _bias_path(flat, path, cols, bias_name, what) if include_bias else None
        if bias is not None:
            b = jnp.abs(jnp.asarray(value_of(bias), jnp.float32))
            s = s + b.reshape(s.shape)
            entries += 1
        out[path] = s / entries if normalize else s
    return out


def far_scores(params: Any, warm: Any, targets: paths_lib.Targets = BERT_FFN, *,
               sites: sites_lib.Sites | None = None, warm_is_delta: bool = False,
               include_bias: bool = True, normalize: bool = False,
               kernel_names: Sequence[str] = ("kernel",), bias_name: str = "bias",
               layers_to_transform: int | Sequence[int] | None = None,
               layers_pattern: str | None = None, exclude: paths_lib.Targets = ()) -> dict:
    """The paper's importance of each output unit: its L1 change over a warm-up fine-tune.

    For each targeted kernel ``W0: [in, out]`` (bias ``b0: [out]``) and its warmed-up value ``W1``::

        s_j = sum_i |W1[i, j] - W0[i, j]| + |b1[j] - b0[j]|            s: float32 [out]

    and for a weight of layout ``(S, I, O)`` (with ``sites``) the same sum over the contracted
    axes ``I`` per stack slice and output feature: ``s: float32 [*S, prod O]`` (the free axes
    flattened row-major in the weight's axis order; bias ``[*S, *O]``).

    Args:
      params: the base tree.
      warm: the warmed-up values ``W1`` at the weights' paths (the whole warmed-up tree, or the
        delta of ``jpeft.full_finetune(targets)``, which holds the trained values), or, with
        ``warm_is_delta``, the change ``W1 - W0`` as an additive delta at those paths. A bias it
        lacks counts as unchanged; a targeted kernel it lacks is an error.
      targets: the weights to score (default: BERT's feed-forward matrices, :data:`BERT_FFN`).
      sites: the model's contraction sites (:func:`jpeft.probe`): any contraction layout. Without
        them only matrices ``[in, out]`` (2-D leaves) are scored.
      include_bias: add the bias entry's change to its column's score.
      normalize: divide by the entries per column (``prod I``, plus one with the bias), a mean
        absolute change that compares matrices of different fan-in (useful for ``budget="global"``).
      kernel_names, bias_name, layers_to_transform, layers_pattern, exclude: the selection.

    Returns:
      ``{kernel path: s}`` as a nested dict mirroring ``params`` (the input of :func:`far_select`).

    Raises:
      ValueError: nothing matches ``targets``, ``warm`` lacks a targeted kernel, a targeted
        weight has no contraction layout in ``sites`` (or, without sites, is not a matrix), or a
        bias whose shape is not ``[*S, *O]``.
    """
    kernels = _kernels(params, sites, targets, kernel_names, layers_to_transform,
                       layers_pattern, exclude, "far_scores")
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

    return paths_lib.unflatten(_column_scores(flat, kernels, sites, change, bias_name,
                                              include_bias, normalize, "far_scores"))


def far_magnitude_scores(params: Any, targets: paths_lib.Targets = BERT_FFN, *,
                         sites: sites_lib.Sites | None = None, include_bias: bool = True,
                         normalize: bool = False, kernel_names: Sequence[str] = ("kernel",),
                         bias_name: str = "bias",
                         layers_to_transform: int | Sequence[int] | None = None,
                         layers_pattern: str | None = None,
                         exclude: paths_lib.Targets = ()) -> dict:
    """The cheap alternative to :func:`far_scores` (no warm-up): the L1 norm of each column,
    ``s_j = sum_i |W0[i, j]| + |b0[j]|`` (float32 ``[out]``; ``[*S, prod O]`` for a weight of layout
    ``(S, I, O)`` given by ``sites``, the sum over ``I``). Arguments as in :func:`far_scores`."""
    kernels = _kernels(params, sites, targets, kernel_names, layers_to_transform,
                       layers_pattern, exclude, "far_magnitude_scores")
    flat = paths_lib.flatten(params)
    return paths_lib.unflatten(_column_scores(flat, kernels, sites, lambda p: flat[p], bias_name,
                                              include_bias, normalize, "far_magnitude_scores"))


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

    A score array ``[*S, n]`` (stack slices of one weight, :func:`far_magnitude_scores` with
    sites) is ``prod(S)`` matrices of ``n`` columns each: the selection runs per slice.

    Rule (exact and documented, so the reported density is what was asked):

    * ``budget="per_matrix"``: each matrix (stack slice) with ``n`` columns keeps
      ``k = round(fraction * n)`` (halves up, see :func:`kept_count`), so the kept fraction of
      every matrix is ``fraction`` whenever ``fraction * n`` is an integer;
    * ``budget="global"``: ``round(fraction * sum n)`` columns over all matrices together, ranked
      by score across matrices (scores must then be comparable: see ``normalize`` in
      :func:`far_scores`); a matrix that gets no column is left out of the result. Only for 1-D
      scores: a stacked weight keeps the same ``k`` in every slice, which a global ranking does
      not give.

    Ties go to the lower column index (and, globally, to the matrix first in tree order).

    Args:
      scores: ``{kernel path: s [*S, n]}`` (e.g. from :func:`far_scores`), any nested dict of
        arrays.
      fraction: the share of columns to keep, in ``(0, 1]``.
      budget: ``"per_matrix"`` or ``"global"``.

    Returns:
      A tree like ``scores`` of sorted ``np.int32`` index arrays ``[*S, k]`` (the input of
      :func:`far`).

    Raises:
      ValueError: ``fraction`` outside ``(0, 1]``; a fraction that keeps no column of some matrix
        (per matrix) or of any (global); scores that are 0-D, empty or not finite; stacked scores
        with ``budget="global"``.
    """
    _check_fraction(fraction)
    if budget not in ("per_matrix", "global"):
        raise ValueError(f"far_select: budget must be 'per_matrix' or 'global', got {budget!r}")
    flat = {p: np.asarray(s) for p, s in paths_lib.flatten(scores).items()}
    if not flat:
        raise ValueError("far_select: no scores given")
    for p, s in flat.items():
        if s.ndim < 1 or s.size == 0:
            raise ValueError(f"far_select: scores of {paths_lib.path_str(p)} must be a non-empty "
                             f"array [n] (one per output column; [*S, n] for a stacked weight), "
                             f"got shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"far_select: scores of {paths_lib.path_str(p)} are not all finite")

    def top(s, k):      # stable sort on -s: ties keep the lower index first; per row
        order = np.argsort(-s.astype(np.float64), axis=-1, kind="stable")[..., :k]
        return np.sort(order, axis=-1).astype(np.int32)

    if budget == "per_matrix":
        out = {}
        for p, s in flat.items():
            n = s.shape[-1]
            k = kept_count(fraction, n)
            if k == 0:
                raise ValueError(
                    f"far_select: fraction {fraction} keeps no column of {paths_lib.path_str(p)} "
                    f"({n} columns; round({fraction} * {n}) = 0). Use a fraction of at "
                    f"least {1 / (2 * n):.3g} for this matrix, or budget='global'.")
            out[p] = top(s, k)
        return paths_lib.unflatten(out)

    stacked = [paths_lib.path_str(p) for p, s in flat.items() if s.ndim != 1]
    if stacked:
        raise ValueError(f"far_select: budget='global' needs 1-D scores, but {stacked[:3]} are "
                         f"stacked ([*S, n]: every slice keeps the same number of columns); use "
                         f"budget='per_matrix'")
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
# Columns against the base tree


def _check_columns(columns: Any) -> dict:
    """``{kernel path: np.int32 [*S, k]}``, ``k >= 1``, each row strictly increasing and
    non-negative."""
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
        if c.ndim < 1 or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"far: the columns of {name} must be a 1-D integer array [k] (or "
                             f"[*S, k], one row per slice of a stacked weight), got {c.dtype} "
                             f"{c.shape}")
        if c.shape[-1] == 0:
            raise ValueError(f"far: no column kept for {name}; leave the matrix out instead")
        if c.size and (c.min() < 0 or np.any(np.diff(c, axis=-1) <= 0)):
            raise ValueError(f"far: the columns of {name} must be non-negative, sorted and "
                             f"distinct (per slice), got {c.reshape(-1, c.shape[-1])[0].tolist()[:10]}")
        out[p] = c.astype(np.int32)
    return out


def _resolve(flat: dict, cols: dict, sites, train_bias: bool, bias_name: str, what: str
             ) -> dict:
    """``{kernel path: (_Columns, bias path or None)}``, checking each index array against its
    weight: shape ``[*S, k]`` and every index in ``[0, prod O)``."""
    out = {}
    for path, c in cols.items():
        lc = _columns_of(flat, path, sites, what)
        name = paths_lib.path_str(path)
        stack = lc.dims(lc.stack)
        if c.shape[:-1] != stack:
            raise ValueError(
                f"{what}: the columns of {name} have shape {c.shape}, but the weight {lc.shape} "
                f"has stack axes {list(lc.stack)} of sizes {list(stack)}: it needs [*S, k] = "
                f"{list(stack) + ['k']} (one row of kept columns per slice)")
        if c.size and int(c.max()) >= lc.n_out:
            raise ValueError(f"{what}: column {int(c.max())} is out of range for {name} with "
                             f"{lc.n_out} columns (output axes {list(lc.free)} of the weight "
                             f"{lc.shape}, flattened)")
        bias = _bias_path(flat, path, lc, bias_name, what) if train_bias else None
        out[path] = (lc, bias)
    return out


# --------------------------------------------------------------------------------------------
# Counting


class FarReport(NamedTuple):
    """What FAR trains of the targeted weights.

    Every stack slice of a weight counts as one matrix ``[in, out]`` (``in = prod I``,
    ``out = prod O``). ``trainable = sum_m k_m * (in_m + 1)`` (kept kernel columns and their bias
    entries; ``+ 0`` for a matrix without bias), ``targeted = sum_m out_m * (in_m + 1)`` (the whole
    targeted matrices and biases); ``column_density = columns_kept / columns_total`` and
    ``param_density = trainable / targeted``. Both equal the ``fraction`` given to
    :func:`far_select` when ``fraction * out`` is an integer for every matrix; otherwise they follow
    from the rounded counts (:func:`kept_count`).
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


def far_report(params: Any, columns: Any, *, train_bias: bool = True, bias_name: str = "bias",
               sites: sites_lib.Sites | None = None) -> FarReport:
    """Counts for ``far(columns)`` on ``params`` (the trainable count equals
    ``jpeft.num_params(delta)``); ``sites`` as given to the method's ``init`` (needed for weights
    that are not matrices ``[in, out]``)."""
    flat = paths_lib.flatten(params)
    cols = _check_columns(columns)
    matrices = kept = total = trainable = targeted = 0
    for path, (lc, bias) in _resolve(flat, cols, sites, train_bias, bias_name,
                                     "far_report").items():
        n, k, has_bias = lc.n_slices, cols[path].shape[-1], bias is not None
        matrices += n
        kept += n * k
        total += n * lc.n_out
        trainable += n * k * (lc.n_in + has_bias)
        targeted += n * lc.n_out * (lc.n_in + has_bias)
    return FarReport(matrices, kept, total, trainable, targeted)


# --------------------------------------------------------------------------------------------
# Stage 2: the method


def _add_columns(m: jax.Array, c: Any, d: jax.Array, sign: float) -> jax.Array:
    """``m[s, :, c[s, j]] += sign * d[s, :, j]`` (``m: [P, R, n]``, ``c: [P, k]``, ``d: [P, R, k]``),
    in ``m``'s dtype, each entry written once."""
    d = d.astype(m.dtype) if sign > 0 else -d.astype(m.dtype)
    add = lambda a, cc, dd: a.at[:, cc].add(dd, indices_are_sorted=True, unique_indices=True)
    if m.shape[0] == 1:
        return add(m[0], c[0], d[0])[None]
    return jax.vmap(add)(m, c, d)


def _far_dot(call: sites_lib.ContractionCall, d: sites_lib.Factor, c: sites_lib.Factor,
             lc: _Columns) -> jax.Array:
    """``y`` with ``op(x, D)`` added at the kept output positions, for a ``dot_general`` call.

    ``op(x, D)``: ``x`` contracted with ``D [*S', *I, k]`` as the call contracts it with the
    weight (:func:`jpeft.core.contraction.dot_with`), giving ``[*B, *X, k]`` (dot batch axes ``B``,
    the input's other axes ``X``); the output, viewed as ``[*B, *X, prod O]`` (free axes in the
    order the call holds them), gets it at the positions of the columns ``c [*B, k]``."""
    g = sparse_lib.dot_geometry(call)
    u = contraction.dot_with(call, call.x, d)                          # [*B, *X, k]
    cols, c_axes = c.value, tuple(c.axes[:-1])
    if sorted(c_axes) != sorted(g.batch):
        raise ValueError(f"far: the columns are laid out for stack axes {list(c_axes)} but this "
                         f"contraction batches weight axes {list(g.batch)}: probe the model again")
    xp = np if isinstance(cols, np.ndarray) else jnp
    if c_axes != g.batch:
        cols = xp.transpose(cols, [c_axes.index(a) for a in g.batch] + [len(c_axes)])
    free = lc.free
    in_order = list(g.free) == sorted(g.free)
    if not in_order:      # stored flat column -> flat position over the call's free axis order
        cols = sparse_lib.ravel_axes(cols, lc.dims(free), tuple(free.index(a) for a in g.free))
    y = call.y
    nb, no = len(g.batch), len(g.free)
    nx = y.ndim - nb - no
    to_last = (*range(nb), *range(nb + no, nb + no + nx), *range(nb, nb + no))
    if g.weight_is_lhs:                                    # [B, O, X] -> [B, X, O]
        y = jnp.transpose(y, to_last)
    shape = y.shape
    n_b = int(np.prod(shape[:nb], dtype=np.int64))
    n_x = int(np.prod(shape[nb:nb + nx], dtype=np.int64))
    k = u.shape[-1]
    y3, u3 = y.reshape(n_b, n_x, lc.n_out), u.reshape(n_b, n_x, k).astype(y.dtype)
    c2 = cols.reshape(n_b, k)
    add = lambda a, cc, dd: a.at[:, cc].add(dd, indices_are_sorted=in_order,
                                            unique_indices=True)
    y3 = add(y3[0], c2[0], u3[0])[None] if n_b == 1 else jax.vmap(add)(y3, c2, u3)
    y = y3.reshape(shape)
    return jnp.transpose(y, np.argsort(to_last)) if g.weight_is_lhs else y


def _far_conv(call: sites_lib.ContractionCall, d: sites_lib.Factor, c: sites_lib.Factor
              ) -> jax.Array:
    """``y`` with ``conv(x, D)`` (the call's own conv with ``k`` output channels,
    ``D [*I, k]``) added at the kept output channels ``c [k]``."""
    p = call.params
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
        raise ValueError("far: a grouped (depthwise) conv has no factored FAR form; use "
                         "mode='materialised'")
    dn = p["dimension_numbers"]
    out_dim = dn.rhs_spec[0]
    pos = {ax: i for i, ax in enumerate(d.axes)}
    order = [pos[None] if j == out_dim else pos[a] for j, a in enumerate(call.weight_axes)]
    kernel = jnp.transpose(d.value.astype(call.x.dtype), order)
    keep = {k: v for k, v in p.items() if k != "out_sharding"}
    t = jax.lax.conv_general_dilated(call.x, kernel, **keep)            # k output channels
    feat = dn.out_spec[1]
    y = jnp.moveaxis(call.y, feat, -1)
    y = y.at[..., c.value].add(jnp.moveaxis(t, feat, -1).astype(y.dtype),
                               indices_are_sorted=True, unique_indices=True)
    return jnp.moveaxis(y, -1, feat)


def far(columns: Any, *, train_bias: bool = True, bias_name: str = "bias",
        name: str = "far") -> method_lib.Method:
    """FAR on the weights and output columns given by ``columns``.

    Args:
      columns: ``{kernel path: int [*S, k]}`` mirroring the base tree (the result of
        :func:`far_select`): per weight (per stack slice of a stacked one), sorted distinct
        indices in ``[0, prod O)``, ``[k]`` for a weight without stack axes. Host values (NumPy).
      train_bias: also train the kept columns' bias entries where the layer has a bias of shape
        ``[*S, *O]``.
      bias_name: leaf name of the bias next to each kernel.
      name: the method's name and optimizer label.

    The delta mirrors the base tree: ``D: [*S, *I, k]`` at each kernel's path (``[in, k]`` for a
    matrix) and ``d: [*S, k]`` at its bias's path, both zero at ``init``. ``init``, ``merge`` and
    ``unmerge`` take the model's sites (:func:`jpeft.probe`), needed for any weight that is not a
    matrix ``[in, out]``; the factored forward uses them to edit each contraction.

    Raises:
      ValueError: (here) malformed columns; (at ``init``) a path not in the base tree, a weight
        without a contraction layout (without sites: not a matrix), columns not shaped
        ``[*S, k]`` for the weight, a column index ``>= prod O`` (naming the path and the column
        count), or a bias not shaped ``[*S, *O]``; (factored forward) a weight that the model also
        uses outside contractions.
    """
    cols = _check_columns(columns)

    def bias_path(path):
        return path[:-1] + (bias_name,)

    def resolve(params, sites) -> dict:
        return _resolve(paths_lib.flatten(params), cols, sites, train_bias, bias_name, "far")

    def init(key, params, sites=None):
        del key
        flat = paths_lib.flatten(params)
        out = {}
        for path, (lc, bias) in resolve(params, sites).items():
            k = cols[path].shape[-1]
            out[path] = jnp.zeros(lc.dims(lc.stack) + lc.dims(lc.contract) + (k,),
                                  flat[path].dtype)
            if bias is not None:
                out[bias] = jnp.zeros(lc.dims(lc.stack) + (k,), flat[bias].dtype)
        return paths_lib.unflatten(out)

    def parts(delta) -> dict:
        """``{kernel path: (cols, D or None, d or None)}`` (``None``: not in ``delta``)."""
        flat = paths_lib.flatten(delta)
        return {p: (c, flat.get(p), flat.get(bias_path(p))) for p, c in cols.items()}

    def scatter(params, delta, sites, sign):
        geo = resolve(params, sites)
        upd = {}
        for path, (c, d_w, d_b) in parts(delta).items():
            lc = geo[path][0]
            if d_w is not None:
                upd[path] = (lc, c, d_w, False)
            if d_b is not None:
                upd[bias_path(path)] = (lc, c, d_b, True)

        def one(_, w, u):
            lc, c, d, is_bias = u
            n, k, w = lc.n_slices, c.shape[-1], jnp.asarray(w)
            m = w.reshape(n, 1, lc.n_out) if is_bias else lc.as_matrices(w)
            m = _add_columns(m, c.reshape(n, k), d.reshape(n, -1, k), sign)
            return m.reshape(w.shape) if is_bias else lc.from_matrices(m)
        return paths_lib.map_selected(one, params, upd)

    merge = lambda params, delta, sites=None: scatter(params, delta, sites, 1.0)
    unmerge = lambda params, delta, sites=None: scatter(params, delta, sites, -1.0)

    def edit_fn(lc: _Columns):
        def fn(call, factors):
            d, c = factors["kernel_cols"], factors["columns"]
            if call.kind == "conv":
                return _far_conv(call, d, c)
            return _far_dot(call, d, c, lc)
        return fn

    def edits(params, delta, sites, context):
        """Factored: at every contraction of a selected weight the kept columns' ``op(x, D)`` is
        added to its output (``y[..., c] += x @ D`` for a matrix); the bias deltas are merged.
        Without sites, or materialised: everything merged."""
        if context.mode == "materialised" or sites is None:
            return sites_lib.Edits(merge(params, delta, sites))
        geo = resolve(params, sites)
        contractions, biases = {}, {}
        for path, (c, d_w, d_b) in parts(delta).items():
            lc = geo[path][0]
            if d_b is not None:
                biases[bias_path(path)] = d_b
            if d_w is None:
                continue
            if lc.layout.other_uses:
                raise ValueError(
                    f"far: {paths_lib.path_str(path)} is also used outside contractions (by "
                    f"{', '.join(lc.layout.other_uses)}), where the factored edit cannot follow "
                    f"it; use mode='materialised', or leave it out of the columns")
            contractions[path] = sites_lib.ContractionEdit(
                {"kernel_cols": sites_lib.Factor(d_w, lc.stack + lc.contract + (None,)),
                 "columns": sites_lib.Factor(c, lc.stack + (None,))}, edit_fn(lc))
        if biases:
            params = scatter(params, paths_lib.unflatten(biases), sites, 1.0)
        return sites_lib.Edits(params, contractions)

    def shardings(param_shardings, delta, sites=None):
        """``D`` takes the kernel's specs of its stack and contracted axes (columns replicated);
        ``d`` the bias's specs of its stack axes (columns replicated)."""
        flat_s = paths_lib.flatten(param_shardings)
        kernel_of = {bias_path(p): p for p in cols}

        def one(kp, _):
            path = paths_lib.to_path(kp)
            base = flat_s[path]
            if not isinstance(base, NamedSharding):
                return base
            spec = tuple(base.spec) + (None,) * 16
            if path in cols:
                if sites is not None:
                    layout = sites.layout(path, what="far")
                elif cols[path].ndim == 1:
                    layout = MATRIX
                else:
                    raise ValueError(f"far: the shardings of the stacked weight "
                                     f"{paths_lib.path_str(path)} need the model's sites")
                axes = tuple(sorted(layout.stack)) + tuple(sorted(layout.contract))
                return NamedSharding(base.mesh, PartitionSpec(*(spec[a] for a in axes), None))
            n_stack = cols[kernel_of[path]].ndim - 1
            if n_stack == 0:
                return NamedSharding(base.mesh, PartitionSpec())
            return NamedSharding(base.mesh, PartitionSpec(*spec[:n_stack], None))
        return jax.tree_util.tree_map_with_path(one, delta)

    config = {"method": "far", "name": name, "train_bias": train_bias, "bias_name": bias_name,
              "columns_kept": {paths_lib.path_str(p): int(c.size) for p, c in cols.items()}}
    return method_lib.Method(
        name=name, init=init, merge=merge, unmerge=unmerge, edits=edits,
        shardings=shardings, labels=method_lib.constant_labels(name), config=config,
        data=paths_lib.unflatten(dict(cols)))
