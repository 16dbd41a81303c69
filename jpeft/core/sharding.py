"""Shardings for deltas and optimizer state, derived from those of the base weights.

The base parameters carry ``NamedSharding``s (FSDP, tensor parallel, or both). Each method derives
its delta's shardings from them (``Method.shardings``): a delta of whole leaves (additive or
replacing) takes its weight's sharding, a LoRA factor takes the spec of the weight axis it shares,
with the rank axis replicated. Optimizer state that mirrors the delta (Adam's moments) takes the
delta's shardings; scalars are replicated.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib


def shardings_of(tree: Any) -> Any:
    """The ``.sharding`` of every (concrete) array leaf."""
    return jax.tree_util.tree_map(lambda x: x.sharding, tree)


def axis_size(mesh: Mesh, axes: Any) -> int:
    """How many devices a ``PartitionSpec`` entry splits over: the product of the sizes of
    ``axes`` (a mesh axis name, a tuple of them, or ``None``: 1) in ``mesh``."""
    size = 1
    for a in (axes if isinstance(axes, tuple) else (axes,)):
        size *= mesh.shape[a] if a is not None else 1
    return size


def rule_sharding(mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]],
                  default: PartitionSpec = PartitionSpec()
                  ) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """``(path, shape) -> NamedSharding``: the spec of the first rule whose regex fully matches
    the '/'-joined ``path`` (RE2, :func:`jpeft.core.paths.fullmatch`), else ``default``.

    A spec with more entries than the leaf has dimensions, or an axis that does not divide the
    dimension, raises a ``ValueError`` naming the leaf. (Per leaf, so a checkpoint loader can
    place each tensor before the tree exists: :func:`jpeft.models.load_hf_llama_sharded`.)
    """
    def one(path: str, shape: tuple[int, ...]) -> NamedSharding:
        spec = next((s for pat, s in rules if paths_lib.fullmatch(pat, path)), default)
        if len(spec) > len(shape):
            raise ValueError(f"shard_by_rules: spec {spec} has more axes than {path} {shape}")
        for i, (dim, axis) in enumerate(zip(shape, spec)):
            size = axis_size(mesh, axis)
            if dim % size:
                raise ValueError(f"shard_by_rules: {path} {tuple(shape)}: dimension {i} (size "
                                 f"{dim}) not divisible by mesh axes {axis!r} of size {size}; "
                                 f"replicate that dimension (None in the rule's spec) or use "
                                 f"mesh axes whose size divides {dim}")
        return NamedSharding(mesh, spec)
    return one


def shard_by_rules(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, PartitionSpec]],
                   default: PartitionSpec = PartitionSpec()) -> Any:
    """``NamedSharding`` per leaf of ``tree`` by :func:`rule_sharding`."""
    one = rule_sharding(mesh, rules, default)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: one(paths_lib.path_str(paths_lib.to_path(kp)), tuple(x.shape)), tree)


def delta_shardings(method: method_lib.Method, param_shardings: Any, delta: Any,
                    sites: Any = None) -> Any:
    """Shardings for ``delta`` (concrete or abstract) from the base tree's shardings (``sites``:
    the model's contraction sites, for methods whose factors follow a weight's layout)."""
    return method.shardings(param_shardings, delta, sites)


def opt_state_shardings(optimizer, delta: Any, delta_shards: Any, mesh: Mesh) -> Any:
    """Shardings for ``optimizer.init(delta)``: subtrees shaped like the delta follow it.

    Every subtree of the optimizer state with the delta's tree structure (moments, traces, masks)
    gets the delta's shardings; any other leaf (step counts, scalars) is replicated over ``mesh``.
    """
    state = jax.eval_shape(optimizer.init, delta)
    delta_def = jax.tree_util.tree_structure(delta)
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_delta_like(x):
        if x is None or isinstance(x, jax.ShapeDtypeStruct):
            return False
        return jax.tree_util.tree_structure(x) == delta_def

    def place(x):
        if is_delta_like(x):
            return delta_shards
        return jax.tree_util.tree_map(lambda _: replicated, x)
    return jax.tree_util.tree_map(place, state, is_leaf=is_delta_like)


def follow_weight_axes(param_shardings: Any, delta: Any,
                       axes_of: Callable[[paths_lib.Path, str], tuple[int | None, ...]]) -> Any:
    """Shardings of factor leaves stored under the path of the weight they adapt.

    A delta leaf at ``weight_path + (name,)`` takes, for its axis ``j``, the mesh axes of the
    weight's axis ``axes_of(weight_path, name)[j]`` (``None``: replicated). LoRA's ``A [*S, *I, r]``
    shares the weight's stacked and input axes, ``B [*S, r, *O]`` its stacked and output axes, and
    the rank axis is replicated. A weight without a ``NamedSharding`` passes its sharding through.
    """
    flat_s = paths_lib.flatten(param_shardings)

    def one(kp, _):
        path = paths_lib.to_path(kp)
        base = flat_s[path[:-1]]
        if not isinstance(base, NamedSharding):
            return base
        spec = tuple(base.spec) + (None,) * 8
        axes = axes_of(path[:-1], path[-1])
        return NamedSharding(base.mesh, PartitionSpec(
            *(None if a is None else spec[a] for a in axes)))
    return jax.tree_util.tree_map_with_path(one, delta)


def replicated(param_shardings: Any, delta: Any, sites: Any = None) -> Any:
    """Every leaf of ``delta`` replicated on the mesh of the base tree's first ``NamedSharding``
    (``None`` leaves without one): for small deltas that do not live along a weight (adapters,
    prefixes, prompts)."""
    del sites
    mesh = next((s.mesh for s in jax.tree_util.tree_leaves(param_shardings)
                 if isinstance(s, NamedSharding)), None)
    return jax.tree_util.tree_map(
        lambda _: None if mesh is None else NamedSharding(mesh, PartitionSpec()), delta)
