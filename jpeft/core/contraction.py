"""Contracting the input of a contraction site with tensors laid out along its weight.

Everything here is written in the weight's own axis numbering, so one implementation serves a
Dense kernel ``[in, out]``, a DenseGeneral kernel ``[in, heads, head_dim]``, an einsum weight in
any axis order, a stacked ``[L, in, out]`` kernel under ``scan`` (one slice per iteration) and a
conv kernel ``[kh, kw, in, out]``.

A low-rank change of a weight ``W`` with layout ``(stack S, contract I, free O)`` is a pair of
factors ``A: [*S, *I, r]`` and ``B: [*S, r, *O]`` (axes of ``S``, ``I``, ``O`` in the weight's order),
``dW[s, i, o] = sum_k A[s, i, k] B[s, k, o]``. At a call ``y = op(x, W)`` the factored form adds
``op(x, dW)`` as ``(x . A) . B``: first ``x`` against ``A`` over ``I`` (batched over ``S``), then the
rank against ``B``; the ``[*I, *O]`` matrix is never formed, and neither is its gradient.

Every such product is computed as one (batched) matrix product of operands flattened to
``[batch, rows, contracted] @ [batch, contracted, cols]`` (:func:`matmul`), not as an ``einsum``
over the model's own axes: differentiating a contraction over several token axes (``[B, T, r]``
against ``[B, T, O]`` for the gradient of ``B``) makes XLA:CPU transpose the ``[B*T, O]``
cotangent inside its elementwise fusion, a strided pass that cost more than all of LoRA's
matrix products together (``benchmarks/README.md``, step cost). A tall operand such as
``A [in, r]`` enters through its transpose behind an optimization barrier, so that its gradient
is the wide product ``[r, in]`` (:func:`matmul`).
"""

from __future__ import annotations

import math
import string
from typing import Sequence

import jax
import jax.numpy as jnp

from jpeft.core import compat
from jpeft.core import sites as sites_lib

Factor = sites_lib.Factor


def low_rank_axes(layout: sites_lib.Contraction) -> tuple[tuple, tuple]:
    """The weight axes of ``A`` and ``B`` (``None``: the rank axis) for a layout."""
    s = tuple(layout.stack)
    return s + tuple(layout.contract) + (None,), s + (None,) + tuple(layout.free)


def low_rank_shapes(shape: Sequence[int], layout: sites_lib.Contraction, rank: int
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``A: [*S, *I, r]`` and ``B: [*S, r, *O]`` for a weight of ``shape``."""
    a_axes, b_axes = low_rank_axes(layout)
    dim = lambda a: rank if a is None else int(shape[a])
    return tuple(map(dim, a_axes)), tuple(map(dim, b_axes))


def _letters(n: int, taken: str = "") -> list[str]:
    free = [c for c in string.ascii_letters if c not in taken]
    if n > len(free):
        raise ValueError(f"contraction: {n} axes are more than einsum can name")
    return free[:n]


def outer(a: Factor, b: Factor, shape: Sequence[int], axes: Sequence | None = None
          ) -> jax.Array:
    """``dW = sum_k A[..., k, ...] B[..., k, ...]`` laid out like the weight (``shape``), whose
    axis ``i`` is ``axes[i]`` (default: weight axis ``i``; a slice or a view of the weight has
    others, :class:`~jpeft.core.sites.Axis` included).

    Every weight axis must appear in ``a`` or ``b``; an axis in both is a batch (stack) axis.
    An axis in neither is one no factor varies along (a broadcast): ``dW`` is repeated along it.
    Computed in float32.
    """
    axes = tuple(range(len(shape))) if axes is None else tuple(axes)
    names = _letters(len(axes) + 1)
    letter = dict(zip(axes, names))
    rank = names[-1]
    spec = lambda f: "".join(rank if ax is None else letter[ax] for ax in f.axes)
    missing = [i for i, ax in enumerate(axes) if ax not in a.axes and ax not in b.axes]
    if any(sites_lib.cover(axes[i]) for i in missing):
        raise ValueError(f"contraction.outer: weight axes {[axes[i] for i in missing]} are in "
                         f"neither factor")
    present = "".join(names[i] for i in range(len(axes)) if i not in missing)
    d = jnp.einsum(f"{spec(a)},{spec(b)}->{present}",
                   a.value.astype(jnp.float32), b.value.astype(jnp.float32))
    for i in missing:
        d = jnp.expand_dims(d, i)
    return jnp.broadcast_to(d, tuple(shape))


def _dot_specs(call: sites_lib.ContractionCall):
    """Einsum letters for a ``dot_general`` call: ``(x_spec, y_spec, letter_of_weight_axis)``."""
    (lc, rc), (lb, rb) = compat.dot_dims(call.params)
    wc, wb = (lc, lb) if call.weight_is_lhs else (rc, rb)
    xc, xb = (rc, rb) if call.weight_is_lhs else (lc, lb)
    w_axes = call.weight_axes
    names = iter(_letters(len(w_axes) + call.x.ndim + 2))
    letter = {a: next(names) for a in w_axes}                    # weight axis -> letter
    x_spec = [""] * call.x.ndim
    for xi, wi in zip(xc, wc):
        x_spec[xi] = letter[w_axes[wi]]
    for xi, wi in zip(xb, wb):
        x_spec[xi] = letter[w_axes[wi]]
    x_free = [i for i in range(call.x.ndim) if not x_spec[i]]
    for i in x_free:
        x_spec[i] = next(names)
    batch = [letter[w_axes[wi]] for wi in wb]
    w_free = [letter[a] for i, a in enumerate(w_axes) if i not in wc and i not in wb]
    xf = [x_spec[i] for i in x_free]
    y_spec = batch + (w_free + xf if call.weight_is_lhs else xf + w_free)
    rank = next(names)
    return "".join(x_spec), "".join(y_spec), letter, rank, batch, xf


def _factor_spec(f: Factor, letter: dict, rank: str, what: str) -> str:
    try:
        return "".join(rank if a is None else letter[a] for a in f.axes)
    except KeyError:
        raise ValueError(f"{what}: the factor's weight axes {f.axes} do not fit this contraction "
                         f"(its weight axes: {sorted(letter)})") from None


def _precision(call, dtype=None):
    """The call's ``precision``, and its ``preferred_element_type`` unless that is narrower than
    ``dtype`` (the adapter path's compute dtype, which must not be rounded down)."""
    kw = compat.dot_kwargs(call.params)
    pet = kw["preferred_element_type"]
    if dtype is not None and pet is not None and jnp.dtype(pet).itemsize < jnp.dtype(dtype).itemsize:
        kw["preferred_element_type"] = None
    return kw


def _permute(x: jax.Array, spec: str, to: str) -> jax.Array:
    return x if spec == to else jnp.transpose(x, [spec.index(c) for c in to])


def _reshape(x: jax.Array, shape) -> jax.Array:
    shape = tuple(shape)
    return x if x.shape == shape else x.reshape(shape)


def _product(x3: jax.Array, w3: jax.Array, nb: int, precision, preferred_element_type
             ) -> jax.Array:
    """``x3 [*b, rows, k] @ w3 [*b, k, cols]`` (``nb`` batch axes, 0 or 1)."""
    w_contract = nb
    if w3.shape[-2] > w3.shape[-1]:
        # A tall operand (``A [in, r]``): contract with its transpose ``[r, in]`` held behind an
        # optimization barrier, so the gradient ``dW^T = dy^T x`` is computed wide (``[r, in]``,
        # then transposed) instead of ``x^T dy [in, r]``, the form XLA:CPU otherwise folds the
        # transpose into and runs 2-5x slower (``benchmarks/README.md``, LoRA's products).
        w3, w_contract = jax.lax.optimization_barrier(jnp.swapaxes(w3, -1, -2)), nb + 1
    batch_dims = (tuple(range(nb)), tuple(range(nb)))
    return jax.lax.dot_general(x3, w3, (((nb + 1,), (w_contract,)), batch_dims),
                               precision=precision, preferred_element_type=preferred_element_type)


def matmul(x: jax.Array, x_spec: str, w: jax.Array, w_spec: str, out_spec: str, *,
           precision=None, preferred_element_type=None) -> jax.Array:
    """``einsum(f"{x_spec},{w_spec}->{out_spec}", x, w)`` as one matrix product.

    Letters in both operands and the output are batch axes, in both operands only contracted,
    in one operand only its free axes; ``out_spec`` must hold every batch and free letter. The
    operands are permuted (only where their axes are out of order) and reshaped to
    ``[batch, rows, k]`` and ``[batch, k, cols]`` (2-D without batch axes), so the product and
    its gradients are plain matrix products over the flattened axes.
    """
    batch = [c for c in x_spec if c in w_spec and c in out_spec]
    contracted = [c for c in x_spec if c in w_spec and c not in out_spec]
    x_free = [c for c in x_spec if c not in w_spec]
    w_free = [c for c in w_spec if c not in x_spec]
    if sorted(out_spec) != sorted(batch + x_free + w_free):
        raise ValueError(f"contraction.matmul: {x_spec},{w_spec}->{out_spec} is not a matrix "
                         f"product (an operand's own axis is summed away, or a letter repeats)")
    size = dict(zip(x_spec, x.shape)) | dict(zip(w_spec, w.shape))
    n = lambda letters: math.prod(size[c] for c in letters)
    lead = (n(batch),) if batch else ()
    x3 = _reshape(_permute(x, x_spec, "".join(batch + x_free + contracted)),
                  (*lead, n(x_free), n(contracted)))
    w3 = _reshape(_permute(w, w_spec, "".join(batch + contracted + w_free)),
                  (*lead, n(contracted), n(w_free)))
    y = _product(x3, w3, len(lead), precision, preferred_element_type)
    y_spec = "".join(batch + x_free + w_free)
    return _permute(_reshape(y, [size[c] for c in y_spec]), y_spec, out_spec)


def dense(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [..., in] @ w [in, *out] -> [..., *out]`` as one 2-D product over the flattened leading
    axes of ``x`` (see the module note on why)."""
    y = x.reshape(-1, x.shape[-1]) @ w.reshape(w.shape[0], -1)
    return y.reshape(*x.shape[:-1], *w.shape[1:])


def dot_low_rank(call: sites_lib.ContractionCall, x: jax.Array, a: Factor, b: Factor) -> jax.Array:
    """``op(x, dW)`` for ``dW = outer(a, b)``, computed as ``(x . A) . B`` (same layout as
    ``call.y``). ``x`` replaces ``call.x`` (e.g. after dropout)."""
    x_spec, y_spec, letter, rank, batch, xf = _dot_specs(call)
    a_spec = _factor_spec(a, letter, rank, "low rank A")
    b_spec = _factor_spec(b, letter, rank, "low rank B")
    _check_split(call, a_spec, b_spec, letter, rank)
    if all(c in a_spec and c in b_spec for c in batch) and set(y_spec) <= set(x_spec + b_spec):
        return _low_rank_flat(call, x, x_spec, a, a_spec, b, b_spec, y_spec, batch, rank)
    u_spec = "".join(c for c in batch if c in a_spec or c in x_spec) + "".join(xf) + rank
    u = matmul(x, x_spec, a.value.astype(x.dtype), a_spec, u_spec, **_precision(call, x.dtype))
    # Output axes that neither u nor B has (a weight axis made by a broadcast, which no factor
    # varies along): the product is computed without them and repeated along them.
    bare = [i for i, c in enumerate(y_spec) if c not in u_spec and c not in b_spec]
    core = "".join(c for i, c in enumerate(y_spec) if i not in bare)
    y = matmul(u, u_spec, b.value.astype(u.dtype), b_spec, core, **_precision(call, u.dtype))
    for i in bare:
        y = jnp.expand_dims(y, i)
    return jnp.broadcast_to(y, call.y.shape)


def _low_rank_flat(call, x, x_spec, a, a_spec, b, b_spec, y_spec, batch, rank):
    """:func:`dot_low_rank` where ``A`` and ``B`` hold every batch axis and the output no axis
    of their own: ``x`` flattened to ``[*b, rows, in]`` once, both products on it, one reshape
    back (the rank-``r`` intermediate stays flat)."""
    contracted = [c for c in x_spec if c in a_spec and c not in batch]
    rows = [c for c in x_spec if c not in a_spec]
    out = [c for c in b_spec if c != rank and c not in batch]
    size = dict(zip(x_spec, x.shape)) | dict(zip(b_spec, b.value.shape))
    n = lambda letters: math.prod(size[c] for c in letters)
    lead = (n(batch),) if batch else ()
    x3 = _reshape(_permute(x, x_spec, "".join(batch + rows + contracted)),
                  (*lead, n(rows), n(contracted)))
    r = a.value.shape[a_spec.index(rank)]
    a3 = _reshape(_permute(a.value.astype(x.dtype), a_spec, "".join(batch + contracted) + rank),
                  (*lead, n(contracted), r))
    u3 = _product(x3, a3, len(lead), **_precision(call, x.dtype))
    b3 = _reshape(_permute(b.value.astype(u3.dtype), b_spec, "".join(batch) + rank + "".join(out)),
                  (*lead, r, n(out)))
    y3 = _product(u3, b3, len(lead), **_precision(call, u3.dtype))
    y_flat = "".join(batch + rows + out)
    return _permute(_reshape(y3, [size[c] for c in y_flat]), y_flat, y_spec)


def _check_split(call, a_spec, b_spec, letter, rank):
    """``A`` must hold exactly the contracted and batch axes of this call, ``B`` exactly the batch
    and free ones (axes a broadcast made, which no weight axis spans, in either or neither):
    otherwise the factors were made for another layout."""
    (lc, rc), (lb, rb) = compat.dot_dims(call.params)
    wc, wb = (lc, lb) if call.weight_is_lhs else (rc, rb)
    w = call.weight_axes
    spanned = {i for i in range(len(w)) if sites_lib.cover(w[i])}
    want_a = {letter[w[i]] for i in (*wc, *wb) if i in spanned} | {rank}
    want_b = {letter[w[i]] for i in range(len(w)) if i not in wc and i in spanned} | {rank}
    bare = {letter[w[i]] for i in range(len(w)) if i not in spanned}
    a_spec, b_spec = set(a_spec) - bare, set(b_spec) - bare
    if set(a_spec) != want_a or set(b_spec) != want_b:
        inv = {v: k for k, v in letter.items()}
        show = lambda s: sorted(str(inv.get(c, "r")) for c in s)
        raise ValueError(
            f"low rank factors laid out for weight axes A {show(a_spec)}, B {show(b_spec)} but this "
            f"contraction needs A {show(want_a)}, B {show(want_b)} (contracted "
            f"{sorted(str(w[i]) for i in wc)}, batch {sorted(str(w[i]) for i in wb)}): probe the "
            f"model again")


def dot_with(call: sites_lib.ContractionCall, x: jax.Array, t: Factor) -> jax.Array:
    """``x`` contracted with ``t`` as the call contracts ``x`` with its weight: ``t``'s weight
    axes must include the contracted ones; its other axes are kept, after the call's batch and
    ``x``'s free axes, in ``t``'s order (``None`` axes included)."""
    x_spec, _, letter, rank, batch, xf = _dot_specs(call)
    extra = iter(_letters(len(t.axes), x_spec + "".join(letter.values()) + rank))
    t_spec = "".join(next(extra) if a is None else letter[a] for a in t.axes)
    (lc, rc), (lb, rb) = compat.dot_dims(call.params)
    wc = lc if call.weight_is_lhs else rc
    contracted = {letter[call.weight_axes[i]] for i in wc}
    kept = [c for c in t_spec if c not in contracted and c not in batch]
    return matmul(x, x_spec, t.value.astype(x.dtype), t_spec, "".join(batch + xf + kept),
                  **_precision(call))


def conv_low_rank(call: sites_lib.ContractionCall, x: jax.Array, a: Factor, b: Factor
                  ) -> jax.Array:
    """``conv(x, dW)`` for ``dW = outer(a, b)`` as Hugging Face PEFT's LoRA on a conv does it:
    a conv with ``A`` (``r`` output channels, the weight's window) then a 1x1 conv with ``B``
    (a contraction of the channel axis). ``A``: input-feature and spatial axes + rank; ``B``: rank
    + the output-feature axis."""
    p = call.params
    if compat.conv_groups(p) != (1, 1):
        raise ValueError("low rank on a grouped (depthwise) conv is not supported")
    dims = compat.conv_dims(p)
    out_dim = dims.kernel_out
    w = call.weight_axes
    pos = {ax: i for i, ax in enumerate(a.axes)}
    try:
        order = [pos[None] if j == out_dim else pos[w[j]] for j in range(len(w))]
    except KeyError:
        raise ValueError(f"conv low rank: A's weight axes {a.axes} do not fit a conv whose "
                         f"kernel axes are {w}") from None
    if len(order) != len(a.axes) or b.axes not in ((None, w[out_dim]),):
        raise ValueError(f"conv low rank: factors A {a.axes}, B {b.axes} do not fit kernel axes "
                         f"{w} (output feature axis {w[out_dim]})")
    kernel = jnp.transpose(a.value.astype(x.dtype), order)
    t = compat.conv_again(x, kernel, p)
    feat = dims.out_feature
    names = _letters(t.ndim + 1)
    t_spec = "".join(names[:t.ndim])
    y_spec = t_spec[:feat] + names[-1] + t_spec[feat + 1:]
    return jnp.einsum(f"{t_spec},{t_spec[feat]}{names[-1]}->{y_spec}", t,
                      b.value.astype(t.dtype), precision=p.get("precision"))


def ragged_low_rank(call: sites_lib.ContractionCall, x: jax.Array, a: Factor, b: Factor
                    ) -> jax.Array:
    """``ragged_dot(x, dW)`` for a grouped weight ``W [g, k, n]`` (one slice per group of rows:
    MoE experts) and ``dW = outer(a, b)``: ``ragged_dot(ragged_dot(x, A [g, k, r]), B [g, r,
    n])`` with the call's group sizes, so each row meets its own group's factors."""
    d = compat.ragged_dims(call.params)
    w = call.weight_axes
    g, k, n = w[d.group], w[d.contract], w[d.free]

    def arranged(f: Factor, order) -> jax.Array:
        try:
            return jnp.transpose(f.value, [f.axes.index(o) for o in order])
        except ValueError:
            raise ValueError(f"ragged low rank: factor axes {f.axes} do not fit the grouped "
                             f"weight's axes {w}") from None
    kw = compat.ragged_kwargs(call.params)
    sizes = call.operands[0]
    u = jax.lax.ragged_dot(x, arranged(a, (g, k, None)).astype(x.dtype), sizes, **kw)
    return jax.lax.ragged_dot(u, arranged(b, (g, None, n)).astype(u.dtype), sizes, **kw)


def low_rank(call: sites_lib.ContractionCall, x: jax.Array, a: Factor, b: Factor) -> jax.Array:
    """:func:`dot_low_rank`, :func:`conv_low_rank` or :func:`ragged_low_rank` by the call's
    kind."""
    if call.kind == "conv":
        return conv_low_rank(call, x, a, b)
    if call.kind == "ragged":
        return ragged_low_rank(call, x, a, b)
    return dot_low_rank(call, x, a, b)
