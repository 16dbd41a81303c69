"""Many adapters on one base: a named set, weighted combinations of LoRA adapters, mixed batches.

**Named adapters** (:class:`AdapterSet`, pure: every operation returns a new set):
``add`` / ``select`` (the active ones, several at once) / ``disable`` / ``delete``;
``set.method_and_delta()`` is what to ``jpeft.wrap`` and ``merge`` with: the active adapters
together (:func:`jpeft.active`: their changes add up on shared weights), or the base model when
none is active. :func:`switch` is a jitted forward of whichever adapters a set has active that
compiles once per selection of method objects: switching among adapters trained with one method
never compiles again.

**Weighted combination** (:func:`weighted_lora`), Hugging Face PEFT's ``add_weighted_adapter``
on the same inputs: LoRA adapters ``k`` with factors ``A_k [in, r_k]``, ``B_k [r_k, out]`` and
scales ``s_k`` combine, per adapted weight, into one LoRA of rank ``r`` with ``alpha = r``:

* ``linear`` (same ranks): ``A = sum_k sign(w_k s_k) sqrt|w_k s_k| A_k``,
  ``B = sum_k sqrt|w_k s_k| B_k`` (an approximation: cross terms appear);
* ``cat``: ``A = [w_1 s_1 A_1 | w_2 s_2 A_2 | ...]``, ``B = [B_1; B_2; ...]`` (exact:
  ``A B = sum_k w_k s_k A_k B_k``; rank ``sum r_k``);
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (same ranks): the ``linear``
  weights, with the ``A_k`` (and separately the ``B_k``) merged by TIES (keep the top ``density``
  of each by magnitude, elect the sign of the summed values, average the agreeing ones), DARE
  (keep each entry with probability ``density``, rescale by ``1 / density``; then a sum, or TIES's
  sign election), or magnitude pruning then a sum;
* ``svd`` and ``<any of the four>_svd``: ``dW = merge_k(w_k, s_k A_k B_k)`` of the full updates,
  then the top ``svd_rank`` singular triplets: ``A = V_r^T`` ... (``B = U_r S_r``), optionally
  clamped at the ``svd_clamp`` quantile of the entries.

DARE's random masks come from ``key`` (``mask_fn`` overrides them: any ``(x, density) -> bool``
array, e.g. to reproduce another implementation's draws).

**Mixed batches** (:func:`mixed`): each example of a batch picks one adapter (or none, ``-1``),
passed per call as ``method_inputs=index [B]`` to the wrapped function. Every adapter's own
factored edit runs on the whole batch and each example keeps its adapter's change:
``y_b = y0_b + sum_k [idx_b = k] (y_k,b - y0_b)`` at every adapted contraction and mark; no
weight is materialised per adapter. Equal to running each example alone with its adapter.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib

Delta = Any


# --------------------------------------------------------------------------------------------
# A named set of adapters


def _identity() -> method_lib.Method:
    """The base model unchanged (no adapter active)."""
    return method_lib.Method(
        name="base", init=lambda key, params, sites=None: {},
        merge=lambda params, delta, sites=None: params,
        unmerge=lambda params, delta, sites=None: params,
        edits=lambda params, delta, sites, context: sites_lib.Edits(params),
        shardings=lambda ps, d, sites=None: {}, labels=lambda d: {}, config={"method": "base"})


class AdapterSet(NamedTuple):
    """Named adapters on one base; ``active`` the names in use (in order)."""
    methods: Mapping[str, method_lib.Method] = {}
    deltas: Mapping[str, Delta] = {}
    active: tuple[str, ...] = ()

    def add(self, name: str, method: method_lib.Method, delta: Delta, *,
            activate: bool = False) -> "AdapterSet":
        """The set with ``name`` added (an error if it exists); active too with ``activate``."""
        if name in self.methods:
            raise ValueError(f"AdapterSet.add: an adapter named {name!r} exists; delete it first")
        return AdapterSet({**self.methods, name: method}, {**self.deltas, name: delta},
                          self.active + ((name,) if activate else ()))

    def select(self, *names: str) -> "AdapterSet":
        """The set with exactly ``names`` active (several add up)."""
        unknown = [n for n in names if n not in self.methods]
        if unknown:
            raise ValueError(f"AdapterSet.select: no adapter named {unknown}; the set has "
                             f"{sorted(self.methods)}")
        return self._replace(active=tuple(dict.fromkeys(names)))

    def disable(self) -> "AdapterSet":
        """The set with none active: the base model."""
        return self._replace(active=())

    def delete(self, name: str) -> "AdapterSet":
        """The set without ``name`` (an error if it does not exist)."""
        if name not in self.methods:
            raise ValueError(f"AdapterSet.delete: no adapter named {name!r}; the set has "
                             f"{sorted(self.methods)}")
        return AdapterSet({k: v for k, v in self.methods.items() if k != name},
                          {k: v for k, v in self.deltas.items() if k != name},
                          tuple(n for n in self.active if n != name))

    def method_and_delta(self) -> tuple[method_lib.Method, Delta]:
        """``(method, delta)`` of the active adapters: one adapter's own pair, several together
        (:func:`jpeft.active`, the delta ``{name: delta}``), or the base model when none is
        active."""
        if not self.active:
            return _identity(), {}
        if len(self.active) == 1:
            name, = self.active
            return self.methods[name], self.deltas[name]
        return (method_lib.active(**{n: self.methods[n] for n in self.active}),
                {n: self.deltas[n] for n in self.active})


def switch(apply_fn: Callable[..., Any], sites: sites_lib.Sites = None, *,
           mode: str = "factored", static_argnames: Sequence[str] = ()) -> Callable[..., Any]:
    """A jitted forward of whichever adapters an :class:`AdapterSet` has active:
    ``forward(adapters, params, *args, **kwargs)`` is ``jpeft.wrap(apply_fn, *adapters
    .method_and_delta())`` applied, without compiling again when the selection changes back.

    One jitted :func:`jpeft.wrap` is kept per selection of *method objects* (with one adapter
    active: the method object alone), the active deltas are its arguments. Adapters trained with
    one method object (``m = jpeft.lora(...)``; a delta per task from ``m.init``) share one
    executable: switching among them never compiles. Selections of other methods compile once
    each, when first used. The cache holds the methods it was built from (an adapter deleted
    and re-added with a new method object compiles anew: nothing is matched by name or config).
    ``static_argnames`` are passed to ``jax.jit`` (the model's Python flags, e.g. ``train``).
    """
    cache: dict = {}
    base = _identity()

    def forward(adapters: AdapterSet, params, *args, **kwargs):
        if not isinstance(adapters, AdapterSet):
            raise TypeError(f"switch: the first argument is the AdapterSet to run, got "
                            f"{type(adapters).__name__}")
        method, delta = adapters.method_and_delta() if adapters.active else (base, {})
        key = tuple((n if len(adapters.active) > 1 else None, id(adapters.methods[n]))
                    for n in adapters.active)
        if key not in cache:
            owners = tuple(adapters.methods[n] for n in adapters.active)    # keeps ids alive
            cache[key] = (owners, jax.jit(method_lib.wrap(apply_fn, method, sites, mode=mode),
                                          static_argnames=tuple(static_argnames)))
        return cache[key][1](params, delta, *args, **kwargs)

    forward.compiled = lambda: sum(f._cache_size() for _, f in cache.values())
    return forward


# --------------------------------------------------------------------------------------------
# Weighted combination of LoRA adapters

LINEAR_FAMILY = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_FAMILY = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = LINEAR_FAMILY + ("cat",) + SVD_FAMILY
MaskFn = Callable[[jax.Array, float], jax.Array]


def _magnitude_mask(x: jax.Array, density: float) -> jax.Array:
    """The ``int(density * size)`` entries of largest magnitude."""
    k = int(density * x.size)
    flat = jnp.abs(x).reshape(-1)
    keep = jnp.zeros(flat.shape, bool).at[jax.lax.top_k(flat, k)[1]].set(True) if k else \
        jnp.zeros(flat.shape, bool)
    return keep.reshape(x.shape)


def _merge_tasks(kind: str, tasks: list[jax.Array], weights: Sequence[float], density: float,
                 sign_method: str, mask_fn: MaskFn) -> jax.Array:
    """PEFT's task-arithmetic family over same-shaped ``tasks`` with scalar ``weights``."""
    if kind in ("ties", "magnitude_prune") and density < 1:
        tasks = [t * _magnitude_mask(t, density) for t in tasks]
    elif kind in ("dare_linear", "dare_ties") and density < 1:
        tasks = [t * mask_fn(t, density) / density for t in tasks]
    stack = jnp.stack(tasks)
    w = jnp.asarray(weights, stack.dtype).reshape((-1,) + (1,) * (stack.ndim - 1))
    if kind in ("linear", "dare_linear", "magnitude_prune"):
        return jnp.sum(stack * w, axis=0)
    sign = jnp.sign(stack)
    total = jnp.sum(stack if sign_method == "total" else sign, axis=0)
    majority = jnp.where(total >= 0, 1.0, -1.0).astype(stack.dtype)
    agree = sign == majority
    kept = jnp.sum(stack * w * agree, axis=0)
    return kept / jnp.maximum(jnp.sum(agree, axis=0), 1).astype(stack.dtype)


def _lora_parts(method: method_lib.Method, delta: Delta) -> tuple[float, dict, dict]:
    config = method.config
    composed = next((config[k] for k in ("compose", "active") if k in config), None)
    if composed is not None:
        loras = [n for n, c in composed.items() if c.get("method") == "lora"]
        way = (f"pass its LoRA part alone, `jpeft.parts(method, delta)[{loras[0]!r}]`, and keep "
               f"the other parts ({', '.join(n for n in composed if n != loras[0])}) yourself"
               if len(loras) == 1 else "pass each LoRA as a method of its own (jpeft.parts)")
        raise ValueError(f"weighted_lora: {method.name!r} is a composition of "
                         f"{', '.join(composed)}; only LoRA factors combine: {way}")
    if config.get("method") != "lora" or config.get("gate"):
        raise ValueError(f"weighted_lora: {method.name!r} is not a plain LoRA (one jpeft.lora "
                         f"method per adapter)")
    flat = paths_lib.flatten(delta)
    a = {p[:-1]: flat[p] for p in flat if p[-1] == "lora_A"}
    b = {p[:-1]: flat[p] for p in flat if p[-1] == "lora_B"}
    for p, x in a.items():
        if np.ndim(x) != 2:
            raise ValueError(f"weighted_lora: {paths_lib.path_str(p)} has factors of rank "
                             f"{np.ndim(x)}; combinations are defined for 2-D weights")
    return float(config["scaling"]), a, b


def weighted_lora(adapters: Sequence[tuple[method_lib.Method, Delta]], weights: Sequence[float],
                  combination_type: str = "svd", *, svd_rank: int | None = None,
                  svd_clamp: float | None = None, density: float | None = None,
                  majority_sign_method: str = "total", key: jax.Array | None = None,
                  mask_fn: MaskFn | None = None) -> tuple[method_lib.Method, Delta]:
    """One LoRA adapter combining ``adapters`` (``(jpeft.lora method, delta)`` pairs) with
    ``weights``, as Hugging Face PEFT's ``add_weighted_adapter`` (module docstring).

    Returns ``(method, delta)``: ``jpeft.lora`` on the union of the adapted weights, rank ``r``
    (``cat``: the sum of the ranks; the SVD family: ``svd_rank`` or the largest rank; otherwise
    the common rank) and ``alpha = r`` (``use_rslora`` of the first adapter).

    Raises:
      ValueError: an unknown ``combination_type``, ranks that differ where they must agree,
        weights that do not match the adapters, a missing ``density`` or ``key``.
    """
    if combination_type not in COMBINATIONS:
        raise ValueError(f"weighted_lora: combination_type must be one of {COMBINATIONS}, got "
                         f"{combination_type!r}")
    if len(adapters) != len(weights) or not adapters:
        raise ValueError(f"weighted_lora: {len(adapters)} adapters but {len(weights)} weights")
    if len(adapters) == 1:
        combination_type = "linear"
    base = combination_type.removesuffix("_svd")
    if base in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        if density is None:
            raise ValueError(f"weighted_lora: {combination_type} needs a density in [0, 1]")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"weighted_lora: majority_sign_method must be 'total' or 'frequency', "
                         f"got {majority_sign_method!r}")
    if base.startswith("dare") and mask_fn is None:
        if key is None:
            raise ValueError(f"weighted_lora: {combination_type} draws random masks: pass key=")
        counter = iter(range(1 << 30))
        mask_fn = lambda x, d: jax.random.bernoulli(jax.random.fold_in(key, next(counter)), d,
                                                    x.shape)
    density = 1.0 if density is None else float(density)
    parts = [_lora_parts(m, d) for m, d in adapters]
    ranks = [m.config["rank"] for m, _ in adapters]
    if combination_type in LINEAR_FAMILY and len(set(ranks)) != 1:
        raise ValueError(f"weighted_lora: {combination_type} needs adapters of one rank, got "
                         f"{ranks} (use cat or an svd combination)")
    rank = (sum(ranks) if combination_type == "cat" else
            (svd_rank or max(ranks)) if combination_type in SVD_FAMILY else ranks[0])
    paths = list(dict.fromkeys(p for _, a, _ in parts for p in a))
    out = {}
    for path in paths:
        present = [(w, s, a[path], b[path]) for (s, a, b), w in zip(parts, weights) if path in a]
        if combination_type == "cat":
            d_in, d_out = present[0][2].shape[0], present[0][3].shape[1]
            new_a = jnp.zeros((d_in, rank), present[0][2].dtype)
            new_b = jnp.zeros((rank, d_out), present[0][3].dtype)
            at = 0
            for w, s, a_k, b_k in present:
                r_k = a_k.shape[1]
                new_a = new_a.at[:, at:at + r_k].set(a_k * (w * s))
                new_b = new_b.at[at:at + r_k, :].set(b_k)
                at += r_k
        elif combination_type in LINEAR_FAMILY:
            wa = [np.sign(w * s or 1.0) * np.sqrt(abs(w * s)) for w, s, _, _ in present]
            wb = [np.sqrt(abs(w * s)) for w, s, _, _ in present]
            new_a = _merge_tasks(combination_type, [a_k for _, _, a_k, _ in present], wa,
                                 density, majority_sign_method, mask_fn)
            new_b = _merge_tasks(combination_type, [b_k for _, _, _, b_k in present], wb,
                                 density, majority_sign_method, mask_fn)
        else:
            kind = "linear" if combination_type == "svd" else base
            dws = [s * (a_k @ b_k) for _, s, a_k, b_k in present]          # [in, out]
            dw = _merge_tasks(kind, dws, [w for w, _, _, _ in present], density,
                              majority_sign_method, mask_fn)
            u, sv, vh = jnp.linalg.svd(dw.T, full_matrices=False)          # torch's [out, in]
            b_t, a_t = u[:, :rank] * sv[:rank], vh[:rank, :]              # [out, k], [k, in]
            if svd_clamp is not None:
                hi = jnp.quantile(jnp.concatenate([b_t.ravel(), a_t.ravel()]), svd_clamp)
                b_t, a_t = jnp.clip(b_t, -hi, hi), jnp.clip(a_t, -hi, hi)
            k = a_t.shape[0]
            new_a = jnp.zeros((a_t.shape[1], rank), dw.dtype).at[:, :k].set(a_t.T)
            new_b = jnp.zeros((rank, b_t.shape[0]), dw.dtype).at[:k, :].set(b_t.T)
        out[path + ("lora_A",)], out[path + ("lora_B",)] = new_a, new_b
    first = adapters[0][0].config
    from jpeft.methods.lora import lora
    combined = lora(sorted("/".join(p) for p in paths), rank=rank, alpha=float(rank),
                    use_rslora=bool(first.get("use_rslora")))
    return combined, paths_lib.unflatten(out)


# --------------------------------------------------------------------------------------------
# Mixed batches


def mixed(**adapters: method_lib.Method) -> method_lib.Method:
    """One batch, one adapter per example (module docstring). The delta is ``{name: delta_k}``;
    the wrapped function takes ``method_inputs=index`` (int ``[B]``: position of the example's
    adapter in the order given, ``-1`` for the base model). Adapters that change parameters
    (BitFit, merged methods) or the model's inputs (prompt tuning) cannot vary per example and
    are refused at the forward pass."""
    if not adapters:
        raise ValueError("mixed needs at least one adapter")
    names = tuple(adapters)

    def init(key, params, sites=None):
        keys = jax.random.split(key, len(names))
        return {n: adapters[n].init(k, params, sites) for n, k in zip(names, keys)}

    def edits(params, delta, sites, context):
        if context.mode != "factored":
            raise ValueError("mixed: per-example adapters need mode='factored'")
        index = context.inputs
        if index is None:
            raise ValueError("mixed: pass each example's adapter as method_inputs=index [B] "
                             f"(positions in {list(names)}, -1 for none)")
        index = jnp.asarray(index)
        contractions: dict = {}
        marks: dict = {}
        for k, n in enumerate(names):
            e = adapters[n].edits(params, delta[n], sites, context._replace(inputs=None))
            if e.params is not params or e.inputs is not None:
                raise ValueError(f"mixed: adapter {n!r} changes the parameters or the inputs of "
                                 f"the model, which cannot differ per example; only adapters "
                                 f"that edit contractions or marks (LoRA, AdaLoRA, IA3, "
                                 f"bottleneck adapters, prefix) mix in one batch. A composition "
                                 f"with a trained head or BitFit part: mix its adapter part "
                                 f"(jpeft.parts(method, delta)) and run the heads on the "
                                 f"output yourself")
            for path, edit in e.contractions.items():
                contractions.setdefault(path, []).append((k, edit))
            for key, edit in e.marks.items():
                marks.setdefault(key, []).append((k, edit))
        return sites_lib.Edits(
            params, {p: _select_contraction(es, index) for p, es in contractions.items()},
            {key: _select_mark(es, index) for key, es in marks.items()})

    def labels(delta):
        return {n: jax.tree_util.tree_map(lambda _, n=n: n, delta[n]) for n in names}

    return method_lib.Method(
        name="mixed", init=init, merge=None, unmerge=None, edits=edits,
        shardings=lambda ps, d, sites=None: {n: adapters[n].shardings(ps, d[n], sites)
                                             for n in names},
        labels=labels, config={"mixed": {n: adapters[n].config for n in names}})


def _per_example(index: jax.Array, k: int, like: jax.Array) -> jax.Array:
    """``[B, 1, ..., 1]`` 0/1 of the examples that use adapter ``k`` (leading axis = example)."""
    if like.shape[:1] != index.shape:
        raise ValueError(f"mixed: method_inputs has {index.shape[0]} examples but an adapted "
                         f"value has leading axis {like.shape[:1]} (the example axis must lead)")
    return (index == k).astype(like.dtype).reshape(index.shape + (1,) * (like.ndim - 1))


def _select_contraction(edits: list, index: jax.Array) -> sites_lib.ContractionEdit:
    factors = {f"{i}:{name}": f for i, (_, e) in enumerate(edits) for name, f in e.factors.items()}

    def fn(call, fs):
        y = call.y
        out = y
        for i, (k, e) in enumerate(edits):
            own = {name[len(f"{i}:"):]: v for name, v in fs.items() if name.startswith(f"{i}:")}
            out = out + _per_example(index, k, y) * (e.fn(call, own) - y)
        return out
    # Each example has its own weight: there is no one edited weight to substitute elsewhere.
    return sites_lib.ContractionEdit(factors, fn, None, all(e.views for _, e in edits))


def _select_mark(edits: list, index: jax.Array) -> sites_lib.MarkEdit:
    arrays = {str(i): e.arrays for i, (_, e) in enumerate(edits)}

    def fn(call, arr):
        v = call.value
        out = v
        for i, (k, e) in enumerate(edits):
            out = out + _per_example(index, k, v) * (e.fn(call, arr[str(i)]) - v)
        return out
    return sites_lib.MarkEdit(arrays, fn)
