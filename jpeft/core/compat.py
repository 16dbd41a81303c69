"""Every JAX internal jpeft reads, in one place: primitive names and their parameter layouts.

The data-flow backend (:mod:`jpeft.core.dataflow`) interprets traced programs (jaxprs) equation by
equation. Which primitive an equation binds and how its parameters are laid out are not a stable
public API: names change between JAX releases (``pjit`` became ``jit``, ``checkpoint`` became
``remat2``, ``custom_vjp_call_jaxpr`` became ``custom_vjp_call``) and so do parameter names. This
module is the only one that knows them; everything else asks it through the functions below.
Public modules only: ``jax.extend.core`` for jaxprs and primitives, ``jax.lax`` for the ops;
nothing from ``jax._src``.

The oldest versions ``pyproject.toml`` admits (its floors) are exercised by CI in a second
environment (``make test-oldest``); code for releases older than the floors does not belong here.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, NamedTuple

import jax
import jax.extend.core as jcore

ClosedJaxpr = jcore.ClosedJaxpr
Jaxpr = jcore.Jaxpr
Literal = jcore.Literal
DropVar = jcore.DropVar

#: Canonical rule names of the primitives the backend follows, by the names JAX releases use.
_CANONICAL = {
    "pjit": "jit", "jit": "jit", "closed_call": "call", "core_call": "call",
    "remat2": "remat", "checkpoint": "remat",
    "custom_jvp_call": "custom_jvp",
    "custom_vjp_call": "custom_vjp", "custom_vjp_call_jaxpr": "custom_vjp",
    "copy_p": "copy",
}

#: Primitives that return their operands unchanged in value and layout (casts, copies, placement,
#: sharding hints, barriers, gradient stops): a weight seen through them is still that weight.
IDENTITIES = frozenset({"convert_element_type", "copy", "sharding_constraint", "reduce_precision",
                        "optimization_barrier", "stop_gradient", "device_put"})

#: Of :data:`IDENTITIES`, those that stop gradients.
GRADIENT_STOPS = frozenset({"stop_gradient"})

#: Primitives that carry sub-programs (jaxprs) in their parameters.
HIGHER_ORDER = frozenset({"jit", "call", "remat", "custom_jvp", "custom_vjp", "cond", "while",
                          "scan"})


def kind(eqn) -> str:
    """The canonical name of the primitive ``eqn`` binds (``"jit"`` for ``pjit``/``jit``)."""
    name = eqn.primitive.name
    return _CANONICAL.get(name, name)


def is_higher_order(eqn) -> bool:
    """Whether ``eqn`` carries sub-programs: one of :data:`HIGHER_ORDER`, or any other primitive
    with jaxprs in its parameters (``shard_map``, ``pallas_call``, ``custom_linear_solve``, ...)."""
    return kind(eqn) in HIGHER_ORDER or any(True for _ in subjaxprs(eqn))


def subjaxprs(eqn) -> Iterator[Any]:
    """The (closed or open) jaxprs in ``eqn``'s parameters."""
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, (ClosedJaxpr, Jaxpr)):
                yield x


def open_jaxpr(j) -> Any:
    """The ``Jaxpr`` of a ``ClosedJaxpr`` (or ``j`` itself)."""
    return getattr(j, "jaxpr", j)


def as_closed(j) -> Any:
    """``j`` with its constants: a ``ClosedJaxpr`` as it is, an open ``Jaxpr`` closed over none.
    (JAX 0.11 merges the two types: a ``Jaxpr`` carries ``consts`` itself and ``.jaxpr`` is the
    jaxpr again; it must not be wrapped, which would turn its constants into inputs.)"""
    return j if hasattr(j, "consts") else ClosedJaxpr(j, ())


def is_tracer(x) -> bool:
    """Whether ``x`` is a value being traced (not a concrete array)."""
    return isinstance(x, jax.core.Tracer)


def aval_of(x) -> Any:
    """The abstract value of an array or tracer (shape, dtype, weak type and, where JAX puts it in
    the type, sharding), hashable: what a trace of a function of ``x`` depends on."""
    return jax.typeof(x)


def bind(eqn, invals) -> list:
    """Bind ``eqn``'s primitive to ``invals`` as the traced program did (same parameters, same
    context: name stack, compute type); always a list of outputs."""
    params = eqn.primitive.get_bind_params(eqn.params)
    ctx = getattr(eqn, "ctx", None)
    manager = getattr(ctx, "manager", None)
    if manager is None:
        out = eqn.primitive.bind(*invals, **params)
    else:
        with manager:
            out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def staging() -> bool:
    """Whether the current trace stages a program out (``jit``, ``eval_shape``, ``make_jaxpr``,
    a transformation inside one), as opposed to running op by op on concrete arrays."""
    under = getattr(jcore, "unsafe_am_i_under_a_jit_DO_NOT_USE", None)
    return bool(under and under())


def segment_fn(invars, outvars, eqns) -> Any:
    """A function computing ``outvars`` from ``invars`` by ``eqns`` (equations of a traced
    program, their own source names dropped: the caller's apply), as ``jax.jit(...,
    inline=True)``: staged into the enclosing program as the equations themselves, while
    transformations (``linearize``, ``vmap``) of it are computed once per input types and cached
    by JAX, as for ``jax.numpy``'s own jitted functions. ``None`` where this JAX builds jaxprs
    another way."""
    def unnamed(eqn):
        info = eqn.source_info
        return eqn.replace(source_info=info.replace(name_stack=type(info.name_stack)()))
    try:
        info = jcore.DebugInfo("jpeft segment", "jpeft segment", (None,) * len(invars),
                               (None,) * len(outvars))
        closed = as_closed(Jaxpr((), list(invars), list(outvars), [unnamed(e) for e in eqns],
                                 debug_info=info))
    except TypeError:              # a JAX whose Jaxpr is built otherwise: bind one by one
        return None
    return jax.jit(jcore.jaxpr_as_fun(closed), inline=True)


# --------------------------------------------------------------------------------------------
# Parameter layouts


def name_of(eqn) -> str:
    """The name a ``checkpoint_name`` (primitive ``name``) gives its value."""
    return eqn.params["name"]


def dot_dims(params) -> tuple[tuple[tuple, tuple], tuple[tuple, tuple]]:
    """``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))`` of a ``dot_general``."""
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    return (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))


def dot_kwargs(params) -> dict:
    """``precision`` and ``preferred_element_type`` of a ``dot_general`` (for products of the
    same precision next to it)."""
    return dict(precision=params.get("precision"),
                preferred_element_type=params.get("preferred_element_type"))


class ConvDims(NamedTuple):
    """A ``conv_general_dilated``'s layout: the kernel's output-feature, input-feature and spatial
    axes, and the output's feature axis."""
    kernel_out: int
    kernel_in: int
    kernel_spatial: tuple[int, ...]
    out_feature: int


def conv_dims(params) -> ConvDims:
    dn = params["dimension_numbers"]
    return ConvDims(dn.rhs_spec[0], dn.rhs_spec[1], tuple(dn.rhs_spec[2:]), dn.out_spec[1])


def conv_groups(params) -> tuple[int, int]:
    """``(feature_group_count, batch_group_count)``."""
    return params.get("feature_group_count", 1), params.get("batch_group_count", 1)


def conv_again(x, kernel, params):
    """``x`` convolved with ``kernel`` exactly as the traced conv (strides, padding, dilations,
    layout, precision)."""
    keep = {k: v for k, v in params.items() if k not in ("out_sharding",)}
    return jax.lax.conv_general_dilated(x, kernel, **keep)


class RaggedDims(NamedTuple):
    """A ``ragged_dot_general`` of the plain ragged-dot form ``[m, k] x [g, k, n] -> [m, n]``:
    the rhs (weight) group, contracted and output axes."""
    group: int
    contract: int
    free: int


def ragged_dims(params) -> RaggedDims | None:
    """The layout of a ``ragged_dot_general`` whose lhs is ``[m, k]`` and rhs ``[g, k, n]`` (the
    form ``jax.lax.ragged_dot`` emits); ``None`` for other ragged forms."""
    rd = params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = rd.dot_dimension_numbers
    if lb or rb or len(lc) != 1 or len(rc) != 1 or tuple(rd.lhs_ragged_dimensions) != (0,) \
            or len(rd.rhs_group_dimensions) != 1:
        return None
    g = rd.rhs_group_dimensions[0]
    free = [a for a in range(3) if a not in (g, rc[0])]
    return RaggedDims(g, rc[0], free[0])


def ragged_kwargs(params) -> dict:
    return dict(precision=params.get("precision"),
                preferred_element_type=params.get("preferred_element_type"),
                group_offset=params.get("group_offset"))


def transpose_perm(eqn) -> tuple[int, ...]:
    return tuple(eqn.params["permutation"])


def reshape_sizes(eqn) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """``(new_sizes, dimensions)``: ``dimensions`` (a transpose applied first) is ``None`` in
    every program ``jnp`` writes."""
    return tuple(eqn.params["new_sizes"]), eqn.params.get("dimensions")


def squeeze_dims(eqn) -> tuple[int, ...]:
    return tuple(eqn.params["dimensions"])


def broadcast_dims(eqn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(shape, broadcast_dimensions)`` of a ``broadcast_in_dim``."""
    return tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])


def slice_bounds(eqn) -> tuple[tuple, tuple, tuple | None]:
    """``(start_indices, limit_indices, strides)`` of a static ``slice``."""
    p = eqn.params
    return tuple(p["start_indices"]), tuple(p["limit_indices"]), (
        None if p["strides"] is None else tuple(p["strides"]))


def dynamic_slice_sizes(eqn) -> tuple[int, ...]:
    """``slice_sizes`` of a ``dynamic_slice`` (its operands: the array, then one start index per
    axis)."""
    return tuple(eqn.params["slice_sizes"])


def split_sizes(eqn) -> tuple[int, tuple[int, ...]]:
    """``(axis, sizes)`` of a ``split`` (one output per size)."""
    return int(eqn.params["axis"]), tuple(int(n) for n in eqn.params["sizes"])


def rev_dims(eqn) -> tuple[int, ...]:
    return tuple(eqn.params["dimensions"])


class Take(NamedTuple):
    """A ``gather`` that takes whole slices along one operand axis (``w[idx]``, ``jnp.take``):
    ``axis`` of the operand is indexed by the indices' leading axes (``n_index_axes`` of them),
    which the result holds at ``result_axes``; the other operand axes follow in order."""
    axis: int
    n_index_axes: int
    result_axes: tuple[int, ...]
    mode: Any
    fill_value: Any


def gather_take(eqn, operand_shape, indices_shape) -> Take | None:
    """The :class:`Take` a ``gather`` is, or ``None`` for other gathers (partial slices, several
    indexed axes, batching dimensions)."""
    p = eqn.params
    dn = p["dimension_numbers"]
    if tuple(getattr(dn, "operand_batching_dims", ())) or len(dn.start_index_map) != 1 \
            or tuple(dn.collapsed_slice_dims) != tuple(dn.start_index_map):
        return None
    axis = dn.start_index_map[0]
    sizes = tuple(p["slice_sizes"])
    if sizes[axis] != 1 or any(s != d for i, (s, d) in enumerate(zip(sizes, operand_shape))
                               if i != axis):
        return None
    if not indices_shape or indices_shape[-1] != 1:       # index vector dimension last, of size 1
        return None
    n_idx = len(indices_shape) - 1
    rank = n_idx + len(operand_shape) - 1
    offset = tuple(dn.offset_dims)
    if offset != tuple(sorted(offset)):
        return None
    result_axes = tuple(i for i in range(rank) if i not in offset)
    return Take(axis, n_idx, result_axes, p.get("mode"), p.get("fill_value"))


def take_mode(take: Take) -> str | None:
    """The ``jnp.take`` mode of a gather's out-of-bounds handling (indices promised in bounds
    give the same values clipped)."""
    text = str(take.mode).lower()
    for m, jnp_mode in (("promise_in_bounds", "clip"), ("clip", "clip"), ("fill", "fill")):
        if m in text:
            return jnp_mode
    return None


class ScanParts(NamedTuple):
    jaxpr: Any          # ClosedJaxpr of the body: (consts, carry, xs) -> (carry, ys)
    num_consts: int
    num_carry: int
    length: int
    reverse: bool
    unroll: Any


def scan_parts(eqn) -> ScanParts:
    p = eqn.params
    if "num_consts" in p:
        nc, nk = p["num_consts"], p["num_carry"]
    else:                           # JAX 0.11: a flat tree of the (consts, carry, xs) operands
        consts, carry, _ = p["ft_in"].unpack()
        nc, nk = len(consts), len(carry)
    return ScanParts(as_closed(p["jaxpr"]), nc, nk, p["length"], p["reverse"], p["unroll"])


class WhileParts(NamedTuple):
    cond: Any           # ClosedJaxpr (cond consts, carry) -> bool
    body: Any           # ClosedJaxpr (body consts, carry) -> carry
    cond_nconsts: int
    body_nconsts: int


def while_parts(eqn) -> WhileParts:
    p = eqn.params
    return WhileParts(p["cond_jaxpr"], p["body_jaxpr"], p["cond_nconsts"], p["body_nconsts"])


def cond_branches(eqn) -> tuple:
    """The branches (ClosedJaxprs) of a ``cond``; its operands are the index, then the branches'
    operands."""
    return tuple(eqn.params["branches"])


class JitParts(NamedTuple):
    jaxpr: Any                   # ClosedJaxpr
    in_shardings: tuple          # jax.sharding.Sharding, or None where unspecified
    out_shardings: tuple
    name: str


def jit_parts(eqn) -> JitParts:
    p = eqn.params
    closed = p.get("jaxpr", p.get("call_jaxpr"))
    closed = as_closed(closed)
    n_in, n_out = len(closed.jaxpr.invars), len(closed.jaxpr.outvars)
    given = lambda s: s if isinstance(s, jax.sharding.Sharding) else None
    ins = tuple(map(given, p.get("in_shardings", (None,) * n_in)))
    outs = tuple(map(given, p.get("out_shardings", (None,) * n_out)))
    return JitParts(closed, ins, outs, str(p.get("name", "jit")))


class RematParts(NamedTuple):
    jaxpr: Any                   # ClosedJaxpr (its constants, if any, attached)
    prevent_cse: bool
    policy: Any


def remat_parts(eqn) -> RematParts:
    p = eqn.params
    return RematParts(as_closed(p["jaxpr"]), p["prevent_cse"], p["policy"])


def mapped_again(eqn, body_fn):
    """For a ``shard_map`` (a body each device runs on its shards), a function of the same
    operands that maps ``body_fn`` (``(*local operands) -> tuple of local outputs``) the same way
    (mesh, specs, checks); ``None`` for other primitives."""
    if kind(eqn) != "shard_map":
        return None
    p = eqn.params
    check = {"check_vma": p["check_vma"]} if "check_vma" in p else {}
    return jax.shard_map(body_fn, mesh=p["mesh"], in_specs=tuple(p["in_specs"]),
                         out_specs=tuple(p["out_specs"]), **check)


def mapped_body(eqn):
    """The body (ClosedJaxpr) of a ``shard_map``."""
    body = eqn.params["jaxpr"]
    return as_closed(body)


def custom_primal(eqn) -> Any:
    """The primal computation (ClosedJaxpr) of a ``custom_jvp``/``custom_vjp`` function call."""
    p = eqn.params
    closed = p.get("call_jaxpr", p.get("fun_jaxpr"))
    return as_closed(closed)


# --------------------------------------------------------------------------------------------
# Runtime state


def accelerators_configured() -> bool:
    """Whether JAX will (or may) run on an accelerator in this process, read without starting a
    backend: ``JAX_PLATFORMS`` when set (anything but ``cpu``), else whether an accelerator plugin
    is installed (the ``jax_plugins`` entry points and namespace JAX discovers them by, or
    ``libtpu``)."""
    import importlib.metadata
    import importlib.util
    import pkgutil
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return any(p.strip() not in ("cpu", "") for p in platforms.split(","))
    if list(importlib.metadata.entry_points(group="jax_plugins")):
        return True
    namespace = importlib.util.find_spec("jax_plugins")        # plugins' namespace package
    if namespace is not None and any(
            True for _ in pkgutil.iter_modules(namespace.submodule_search_locations or [])):
        return True
    return importlib.util.find_spec("libtpu") is not None
