"""Intrinsic dimension: DID and SAID (Aghajanyan et al., 2020, arXiv 2012.13255; Li et al., 2018).

All selected weights move together inside a random ``d``-dimensional subspace::

    theta_D,i = theta_0,i + P_i(theta_d)                        (DID: d trainable numbers)
    theta_D,i = theta_0,i + lambda_g(i) * P_i(theta_(d-m))      (SAID: d - m numbers + m scalars)

For a weight tensor ``i`` with ``D_i`` entries, ``P_i: R^d -> R^D_i`` is a Fastfood transform. With
``LL = 2^ceil(log2 max(d, D_i))`` and ``x = theta_d`` zero-padded to ``LL``::

    P_i(x) = (H G Pi H B x)[:D_i] / (sqrt(LL * sum(G^2)) * sqrt(D_i / LL))
           = (H G Pi H B x)[:D_i] / sqrt(D_i * sum(G^2))

``B``: random +-1 diagonal; ``Pi``: random permutation, ``(Pi v)[k] = v[perm[k]]``; ``G``: diagonal of
standard normals; ``H``: the unnormalised Walsh-Hadamard transform of order ``LL`` (entries +-1),
applied by :func:`jpeft.ops.hadamard.fwht` as small dense blocks, never as a matrix.

Normalisation (the paper's): ``H B e_j`` has ``LL`` entries +-1, ``Pi`` keeps them, ``G`` turns the
squared norm into ``sum(G^2)`` and ``H`` multiplies it by ``LL``, so before truncation every column of
the ``LL x LL`` map has norm exactly ``sqrt(LL * sum(G^2))``. Dividing by it and keeping ``D_i`` of
the ``LL`` rows, rescaled by ``sqrt(LL / D_i)``, gives columns with ``E ||P_i e_j||^2 = 1`` (exactly
1 when ``D_i = LL``): a unit step of ``theta_d`` moves each tensor by about unit norm.

Cost per tensor and forward pass, both exact shortcuts of :mod:`jpeft.ops.hadamard`: the first ``H``
acts on a vector with only ``d`` non-zeros (``O(d' log d' + LL)``, ``d' = 2^ceil(log2 d)``) and only
``D_i`` outputs of the last are kept (``O(LL + D' log D')``), so at most one of the two is a full
``O(LL log LL)`` transform. The backward pass is the transpose: the same transforms in reverse order
(``H`` is symmetric, ``Pi^T`` a gather with the inverse permutation). Memory: a few ``LL``-length
float32 buffers per tensor (``LL = 2^24`` for MiniLM's 11.7M-entry word embedding: 64 MB each).

Nothing random is stored. The factors of tensor ``i`` come from
``jax.random.fold_in(jax.random.key(seed), crc32(path_i))`` and are regenerated inside the jitted
function on every forward pass, all element-wise ``O(LL)`` work that XLA fuses into its consumers:
``B`` (``d`` signs) and ``G`` (``LL`` normals) from the counter-based hash generator of
:mod:`jpeft.ops.counter_random`, and ``Pi`` as a keyed Feistel network
(:mod:`jpeft.ops.permutation`) instead of a sorted ``jax.random.permutation`` (a sort of ``LL``
keys per step: 24 s for ``2^24`` on a 2-core CPU). Measured on that CPU for the whole MiniLM (101
tensors, 22.6M entries, ``sum LL`` = 36M): about 2 s per forward + backward of the projections,
of which the regeneration is about a quarter. A checkpoint is ``theta_d`` (and ``lambda``) plus
``method.config`` (``d``, ``seed``, the selection; :func:`from_config` rebuilds the method from it);
restoring it on the same backend reproduces the projection bit for bit. Keying by the path (not the
position in the selection) keeps a tensor's projection fixed when other tensors are added to or
removed from the selection.

SAID's scalars: one per *layer*, taken generically from the key path by
:func:`jpeft.core.paths.layer_index` (the first integer path component: ``.../layer/3/...``), plus
one shared by all tensors without a layer index (the embeddings; a task head too, if it is
projected): ``m = 7`` for MiniLM's 6 layers. ``groups="tensor"`` gives one scalar per tensor (what
the authors' code does), a callable any grouping. ``lambda`` starts at 1: with
``theta_d = 0`` the delta is zero either way, but at ``lambda = 0`` both gradients would vanish
(``d/d theta ~ lambda``, ``d/d lambda ~ P(theta) = 0``) and training could never start. ``d``
counts the scalars: ``theta`` has ``d - m`` entries, so ``d > m`` is required.

The forward pass is ``apply(merge(params, delta))`` in both of :func:`jpeft.wrap`'s modes (there is
no cheaper factored form: ``P_i(theta)`` is dense in every tensor), so the backward pass forms the
gradient of every selected weight, as full fine-tuning does, and then maps it to ``d`` numbers with
``P^T``.
"""

from __future__ import annotations

import functools
import operator
import zlib
from typing import Any, Callable, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.ops import counter_random
from jpeft.ops import hadamard
from jpeft.ops import permutation

GroupsArg = str | Callable[[paths_lib.Path], Hashable]


# --------------------------------------------------------------------------------------------
# The Fastfood projection of one tensor


class FastfoodFactors(NamedTuple):
    """The random factors of one projection ``R^d -> R^size`` (for tests and inspection; the method
    regenerates them inside its jitted functions).

    Attributes:
      signs: ``B``, float32 ``[d]`` of +-1 (the entries of the ``LL``-diagonal beyond ``d`` multiply
        zeros and are never drawn).
      perm_keys: uint32 Feistel keys of ``Pi`` (:func:`jpeft.ops.permutation.feistel_indices`).
      gauss: ``G``, float32 ``[LL]``.
      ll: ``LL = 2^ceil(log2 max(d, size))``.
    """
    signs: jax.Array
    perm_keys: jax.Array
    gauss: jax.Array
    ll: int


def fastfood_size(d: int, size: int) -> int:
    """``LL = 2^ceil(log2 max(d, size))``."""
    return hadamard.next_power_of_two(max(int(d), int(size), 1))


def _key_words(key: jax.Array, rounds: int) -> jax.Array:
    """uint32 ``[4 + rounds + 2]``: the hash keys of ``B`` (2 words) and ``G`` (2), then the
    Feistel keys of ``Pi``; one threefry call per tensor."""
    return jax.random.bits(key, (4 + rounds + 2,), jnp.uint32)


def _factors(words: jax.Array, d: int, size: int) -> FastfoodFactors:
    ll = fastfood_size(d, size)
    return FastfoodFactors(signs=counter_random.rademacher(words[..., 0:2], d),
                           perm_keys=words[..., 4:],
                           gauss=counter_random.normal(words[..., 2:4], ll), ll=ll)


def fastfood_factors(key: jax.Array, d: int, size: int, *,
                     rounds: int = permutation.DEFAULT_ROUNDS) -> FastfoodFactors:
    """``B``, ``Pi`` and ``G`` of the projection ``R^d -> R^size`` keyed by ``key``.

    ``jax.random.bits(key)`` gives a few 32-bit words; ``B`` and ``G`` come from the counter-based
    hash generator of :mod:`jpeft.ops.counter_random` under two of them (regenerating ``LL``
    normals with threefry in every training step cost more than both Walsh-Hadamard transforms on
    a CPU), ``Pi`` is the Feistel permutation under the rest.
    """
    return _factors(_key_words(key, rounds), d, size)


def _fastfood_core(theta: jax.Array, size: int, words: jax.Array, max_block: int,
                   precision: jax.lax.PrecisionLike) -> tuple[jax.Array, jax.Array]:
    """``(H G Pi H B theta)[..., :size]`` (unnormalised) and ``sum(G^2)`` for key words
    ``[..., W]`` (one projection per leading index); ``theta`` float32 or wider."""
    f = _factors(words, theta.shape[0], size)
    kw = dict(max_block=max_block, precision=precision)
    y = hadamard.fwht_padded(theta * f.signs, f.ll, **kw)                     # H B x      [..., LL]
    y = permutation.permute(y, f.perm_keys) * f.gauss.astype(y.dtype)         # G Pi H B x
    out = hadamard.fwht_head(y, size, **kw)                                   # (H ...)[..., :size]
    return out, jnp.sum(jnp.square(f.gauss), axis=-1)


def fastfood(theta: jax.Array, size: int, key: jax.Array, *,
             max_block: int | None = None,
             precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
             rounds: int = permutation.DEFAULT_ROUNDS) -> jax.Array:
    """``P(theta) = (H G Pi H B theta)[:size] / sqrt(size * sum(G^2))``, float32 ``[size]``.

    Args:
      theta: ``[d]``, ``d >= 1``.
      size: ``D >= 1``, the number of entries of the tensor it generates.
      key: the tensor's key; the factors are :func:`fastfood_factors` ``(key, d, size)``.
      max_block, precision: of the Walsh-Hadamard transforms (:func:`jpeft.ops.hadamard.fwht`).
      rounds: Feistel rounds of the permutation.

    Linear in ``theta``; ``O(LL log LL)`` time, ``O(LL)`` memory, nothing stored. Compiled (a
    ``jax.jit`` inside), so that an eager call does not dispatch and compile op by op.
    """
    return fastfood_many(theta, (size,), jnp.asarray(key)[None], max_block=max_block,
                         precision=precision, rounds=rounds)[0]


def fastfood_many(theta: jax.Array, sizes: Sequence[int], keys: jax.Array, *,
                  max_block: int | None = None,
                  precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
                  rounds: int = permutation.DEFAULT_ROUNDS) -> list[jax.Array]:
    """``[fastfood(theta, sizes[i], keys[i]) for i]``, with one batched projection per distinct
    ``LL``: a handful of large operations instead of a chain per tensor (shorter compilation,
    better-shaped matmuls); the tensors of a batch keep ``2^ceil(log2 max size)`` outputs of the
    last transform and each takes its first ``size``."""
    theta = jnp.asarray(theta)
    if theta.ndim != 1 or theta.shape[0] < 1:
        raise ValueError(f"fastfood: theta must be a non-empty vector, got shape {theta.shape}")
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"fastfood: sizes must be >= 1, got {sizes}")
    if jnp.asarray(keys).shape[:1] != (len(sizes),):
        raise ValueError(f"fastfood_many: {len(sizes)} sizes but keys of shape {keys.shape}")
    return list(_fastfood_many(theta, sizes, keys, max_block=max_block or
                               hadamard.default_max_block(), precision=precision, rounds=rounds))


@functools.partial(jax.jit, static_argnums=(1,), static_argnames=("max_block", "precision", "rounds"))
def _fastfood_many(theta, sizes, keys, *, max_block, precision, rounds):
    theta = theta.astype(jnp.promote_types(theta.dtype, jnp.float32))
    d = theta.shape[0]
    buckets: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        buckets.setdefault(fastfood_size(d, size), []).append(i)
    words = jax.vmap(lambda k: _key_words(k, rounds))(keys)                    # [n, W], once
    out: list[Any] = [None] * len(sizes)
    for idx in buckets.values():
        mp = hadamard.next_power_of_two(max(sizes[i] for i in idx))
        ys, g2 = _fastfood_core(theta, mp, words[jnp.asarray(idx)], max_block, precision)
        for j, i in enumerate(idx):
            out[i] = ys[j, :sizes[i]] * jax.lax.rsqrt(sizes[i] * g2[j]).astype(ys.dtype)
    return tuple(out)


def tensor_key(seed: int, path: paths_lib.Path) -> jax.Array:
    """The key of the tensor at ``path``: ``fold_in(key(seed), crc32("a/b/c"))``."""
    return jax.random.fold_in(jax.random.key(seed), _path_hash(path))


def tensor_keys(seed: int, paths: Sequence[paths_lib.Path]) -> jax.Array:
    """``[tensor_key(seed, p) for p in paths]`` stacked into one key array."""
    hashes = jnp.asarray([_path_hash(p) for p in paths], jnp.uint32)
    return jax.vmap(lambda h: jax.random.fold_in(jax.random.key(seed), h))(hashes)


def _path_hash(path: paths_lib.Path) -> int:
    return zlib.crc32(paths_lib.path_str(path).encode())


# --------------------------------------------------------------------------------------------
# Which tensors, which SAID group


class Plan(NamedTuple):
    """What a DID/SAID method projects onto, for one parameter tree.

    Attributes:
      paths: the selected leaves, in tree order.
      sizes: their numbers of entries ``D_i``.
      groups: per path, the index of its SAID scalar (``None`` for DID).
      group_names: per scalar, a readable name (``"layer 3"``, or the tensor's path).
    """
    paths: tuple[paths_lib.Path, ...]
    sizes: tuple[int, ...]
    groups: tuple[int, ...] | None
    group_names: tuple[str, ...]


def _group_key(path: paths_lib.Path, groups: GroupsArg, layers_pattern: str | None) -> Hashable:
    if callable(groups):
        return groups(path)
    if groups == "tensor":
        return ("tensor", path)
    idx = paths_lib.layer_index(path[:-1], layers_pattern)
    return ("layer", idx) if idx is not None else ("other", None)


def _group_name(key: Hashable) -> str:
    if isinstance(key, tuple) and len(key) == 2 and key[0] == "layer":
        return f"layer {key[1]}"
    if isinstance(key, tuple) and len(key) == 2 and key[0] == "tensor":
        return paths_lib.path_str(key[1])
    if key == ("other", None):
        return "no layer index"
    return str(key)


def plan(params: Any, selection: paths_lib.Selection, *, said: bool, groups: GroupsArg = "layer",
         what: str = "intrinsic") -> Plan:
    """The tensors a method with ``selection`` projects onto, and (SAID) their groups.

    Only floating-point leaves with at least one entry are selected. SAID scalars are ordered:
    layers by index, then the other groups in tree order (``"layer"``: the one group of tensors
    without a layer index last).
    """
    flat = paths_lib.flatten(params)
    chosen = [p for p in paths_lib.select(params, selection, what=what)
              if jnp.issubdtype(flat[p].dtype, jnp.floating) and int(flat[p].size) > 0]
    if not chosen:
        raise ValueError(f"{what}: the selection has no non-empty floating-point leaf")
    hashes: dict[int, paths_lib.Path] = {}
    for p in chosen:
        h = _path_hash(p)
        if h in hashes:          # two tensors would share their random factors
            raise ValueError(f"{what}: paths {paths_lib.path_str(hashes[h])} and "
                             f"{paths_lib.path_str(p)} have the same crc32; rename one")
        hashes[h] = p
    sizes = tuple(int(flat[p].size) for p in chosen)
    if not said:
        return Plan(tuple(chosen), sizes, None, ())
    keys = [_group_key(p, groups, selection.layers_pattern) for p in chosen]
    layer_keys = sorted({k for k in keys if isinstance(k, tuple) and len(k) == 2
                         and k[0] == "layer"}, key=lambda k: k[1])
    order = list(layer_keys)
    for k in keys:
        if k not in order:
            order.append(k)
    index = {k: i for i, k in enumerate(order)}
    return Plan(tuple(chosen), sizes, tuple(index[k] for k in keys),
                tuple(_group_name(k) for k in order))


# --------------------------------------------------------------------------------------------
# The methods


def _check_d(what: str, d: Any) -> int:
    if isinstance(d, bool):
        raise ValueError(f"{what}: d must be a positive integer (the intrinsic dimension), got {d!r}")
    try:
        d = operator.index(d)
    except TypeError:
        raise ValueError(f"{what}: d must be a positive integer (the intrinsic dimension), got "
                         f"{d!r}") from None
    if d < 1:
        raise ValueError(f"{what}: d must be a positive integer (the intrinsic dimension), got {d}")
    return d


def _intrinsic(name: str, d: int, *, said: bool, targets: paths_lib.Targets, seed: int,
               groups: GroupsArg, leaf_names: Sequence[str] | None,
               layers_to_transform: int | Sequence[int] | None, layers_pattern: str | None,
               exclude: paths_lib.Targets, max_block: int | None, rounds: int,
               dtype: Any) -> method_lib.Method:
    d = _check_d(name, d)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{name}: seed must be an int, got {seed!r}")
    if not (isinstance(groups, str) and groups in ("layer", "tensor")) and not callable(groups):
        raise ValueError(f"{name}: groups must be 'layer', 'tensor' or a callable, got {groups!r}")
    max_block = max_block or hadamard.default_max_block()   # resolved now, recorded in config
    hadamard.block_sizes(1, max_block)                        # validates it
    if rounds < 1:
        raise ValueError(f"{name}: rounds must be >= 1, got {rounds}")
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name}: dtype must be a floating type, got {dtype}")
    sel = paths_lib.Selection(targets=targets, leaf_names=None if leaf_names is None
                              else tuple(leaf_names), layers_to_transform=layers_to_transform,
                              layers_pattern=layers_pattern, exclude=exclude)

    def plan_of(params) -> Plan:
        return plan(params, sel, said=said, groups=groups, what=name)

    def budget(p: Plan) -> tuple[int, int]:
        m = len(p.group_names) if said else 0
        if d - m < 1:
            raise ValueError(
                f"{name}: d = {d} must be larger than the number of SAID scalars m = {m} (they "
                f"count inside d, leaving d - m for theta); groups: {list(p.group_names)}")
        return d - m, m

    def init(key, params, sites=None):
        del key, sites                  # theta_d = 0, lambda = 1; the projection is fixed by seed
        n_theta, m = budget(plan_of(params))
        delta = {"theta_d": jnp.zeros((n_theta,), dtype)}
        if said:
            delta["lambda"] = jnp.ones((m,), dtype)
        return delta

    def increments(params, delta) -> dict:
        p = plan_of(params)
        theta = delta["theta_d"]
        if theta.ndim != 1 or theta.shape[0] != budget(p)[0]:
            raise ValueError(f"{name}: theta_d has shape {theta.shape}, expected ({budget(p)[0]},) "
                             f"for d = {d}")
        if said and delta["lambda"].shape != (len(p.group_names),):
            raise ValueError(f"{name}: lambda has shape {delta['lambda'].shape}, expected "
                             f"({len(p.group_names)},): one per group {list(p.group_names)}")
        flat = paths_lib.flatten(params)
        projected = fastfood_many(theta, p.sizes, tensor_keys(seed, p.paths),
                                  max_block=max_block, rounds=rounds)
        out = {}
        for i, (path, inc) in enumerate(zip(p.paths, projected)):
            if said:
                inc = delta["lambda"][p.groups[i]].astype(inc.dtype) * inc
            out[path] = inc.reshape(flat[path].shape)
        return out

    def apply_sign(params, delta, sign):
        incs = increments(params, delta)
        return paths_lib.map_selected(
            lambda _, w, inc: (w + sign * inc.astype(w.dtype)).astype(w.dtype), params, incs)

    merge = lambda params, delta, sites=None: apply_sign(params, delta, 1.0)
    unmerge = lambda params, delta, sites=None: apply_sign(params, delta, -1.0)

    def shardings(param_shardings, delta, sites=None):
        leaves = jax.tree_util.tree_leaves(param_shardings)
        named = next((s for s in leaves if isinstance(s, NamedSharding)), None)
        replicated = NamedSharding(named.mesh, PartitionSpec()) if named is not None else leaves[0]
        return jax.tree_util.tree_map(lambda _: replicated, delta)

    config = {"method": name, "d": d, "seed": seed, "projection": "fastfood",
              "targets": targets, "leaf_names": None if leaf_names is None else list(leaf_names),
              "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern,
              "exclude": exclude, "max_block": max_block, "permutation": f"feistel-{rounds}",
              "dtype": dtype.name}
    if said:
        config["groups"] = groups if isinstance(groups, str) else getattr(
            groups, "__qualname__", repr(groups))
    return method_lib.Method(
        name=name, init=init, merge=merge, unmerge=unmerge,
        edits=method_lib.merge_edits(merge), shardings=shardings,
        labels=method_lib.constant_labels(name), config=config)


def did(d: int, *, targets: paths_lib.Targets = None, seed: int = 0,
        leaf_names: Sequence[str] | None = None,
        layers_to_transform: int | Sequence[int] | None = None,
        layers_pattern: str | None = None, exclude: paths_lib.Targets = (),
        max_block: int | None = None, rounds: int = permutation.DEFAULT_ROUNDS,
        dtype: Any = jnp.float32) -> method_lib.Method:
    """Direct intrinsic dimension: ``theta_D,i = theta_0,i + P_i(theta_d)``, ``d`` trainable numbers.

    Args:
      d: the intrinsic dimension, ``>= 1`` (any size: the cost is ``O(LL log LL)`` per tensor with
        ``LL = 2^ceil(log2 max(d, D_i))``).
      targets: module paths (see :mod:`jpeft.core.paths`); ``None`` = every floating-point leaf, as
        in the paper (exclude a task head that is trained directly, e.g. ``exclude=("classifier",)``).
      seed: fixes every random factor; part of ``config`` and therefore of a checkpoint.
      leaf_names, layers_to_transform, layers_pattern, exclude: narrow the selection.
      max_block: largest dense Hadamard block (:func:`jpeft.ops.hadamard.fwht`); ``None``: the
        backend's default (8 on CPU, 128 on GPU/TPU), resolved when the method is built and stored in
        ``config`` (a different block size changes the float rounding, not the projection).
      rounds: Feistel rounds of the permutations (:mod:`jpeft.ops.permutation`).
      dtype: of ``theta_d``; projections are computed in at least float32.

    Delta: ``{"theta_d": [d]}``, zero at init (the base model exactly).

    Raises:
      ValueError: ``d < 1`` (at construction); a selection that matches nothing (at ``init``).
    """
    return _intrinsic("did", d, said=False, targets=targets, seed=seed, groups="layer",
                      leaf_names=leaf_names, layers_to_transform=layers_to_transform,
                      layers_pattern=layers_pattern, exclude=exclude, max_block=max_block,
                      rounds=rounds, dtype=dtype)


def said(d: int, *, targets: paths_lib.Targets = None, seed: int = 0, groups: GroupsArg = "layer",
         leaf_names: Sequence[str] | None = None,
         layers_to_transform: int | Sequence[int] | None = None,
         layers_pattern: str | None = None, exclude: paths_lib.Targets = (),
         max_block: int | None = None, rounds: int = permutation.DEFAULT_ROUNDS,
         dtype: Any = jnp.float32) -> method_lib.Method:
    """Structure-aware intrinsic dimension: ``theta_D,i = theta_0,i + lambda_g(i) P_i(theta)``.

    Args:
      d: the total budget, ``theta`` (``d - m`` entries) plus the ``m`` scalars; ``d > m``.
      groups: ``"layer"`` (one scalar per layer index of :func:`jpeft.core.paths.layer_index`, and
        one shared by every tensor without a layer index), ``"tensor"`` (one per tensor, as the
        authors' code), or ``path -> hashable`` (tensors with equal values share a scalar).
      targets, seed, leaf_names, layers_to_transform, layers_pattern, exclude, max_block, rounds,
        dtype: as in :func:`did` (``layers_pattern`` also tells :func:`layer_index` where to look).

    Delta: ``{"theta_d": [d - m] zeros, "lambda": [m] ones}``.

    Raises:
      ValueError: ``d < 1`` (at construction); ``d <= m`` or an empty selection (at ``init``).
    """
    return _intrinsic("said", d, said=True, targets=targets, seed=seed, groups=groups,
                      leaf_names=leaf_names, layers_to_transform=layers_to_transform,
                      layers_pattern=layers_pattern, exclude=exclude, max_block=max_block,
                      rounds=rounds, dtype=dtype)


def from_config(config: dict) -> method_lib.Method:
    """The method that ``config`` (a :func:`did`/:func:`said` ``method.config``, e.g. read back from
    a checkpoint's metadata) describes: same selection, ``d``, seed and block size, hence the same
    projection. A callable ``groups`` is not serialisable and cannot be rebuilt."""
    name = config.get("method")
    if name not in ("did", "said"):
        raise ValueError(f"intrinsic.from_config: not a did/said config: {config!r}")
    rounds = int(str(config.get("permutation", f"feistel-{permutation.DEFAULT_ROUNDS}"))
                 .rsplit("-", 1)[1])
    as_tuple = lambda t: tuple(t) if isinstance(t, list) else t
    kwargs = dict(targets=as_tuple(config.get("targets")), seed=config["seed"],
                  leaf_names=config.get("leaf_names"),
                  layers_to_transform=as_tuple(config.get("layers_to_transform")),
                  layers_pattern=config.get("layers_pattern"),
                  exclude=as_tuple(config.get("exclude", ())), max_block=config.get("max_block"),
                  rounds=rounds, dtype=config.get("dtype", "float32"))
    if name == "did":
        return did(config["d"], **kwargs)
    groups = config.get("groups", "layer")
    if groups not in ("layer", "tensor"):
        raise ValueError(f"intrinsic.from_config: groups {groups!r} was a callable; rebuild with it")
    return said(config["d"], groups=groups, **kwargs)
