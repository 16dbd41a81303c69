"""S4 (Chen et al., ICLR 2023, "Parameter-Efficient Fine-Tuning Design Spaces", arXiv 2301.01821):
Adapter, prefix tuning, BitFit and LoRA assigned to groups of consecutive layers.

The paper refines a design space with four components, keeping greedily the best choice of each;
the model of the final space ``S_4`` (the "S4-model") is:

1. **layer grouping**: the ``L`` layers are split into ``G = 4`` groups of consecutive layers
   ``G_1, ..., G_4`` in a *spindle* pattern: the groups at both ends hold fewer layers than the
   groups in the middle (the alternatives were increasing, uniform, decreasing and bottleneck);
2. **trainable parameter allocation**: *uniform*, every layer gets the same number of trainable
   parameters (against increasing or decreasing with depth);
3. **tunable groups**: *all* groups are tuned;
4. **strategy assignment**: each group gets its own combination of Adapter (A), Prefix (P),
   BitFit (B) and LoRA (L)::

       G_1: A, L      G_2: A, P      G_3: A, P, B      G_4: P, B, L

   (:data:`PAPER_STRATEGIES`).

Here S4 is no new math: :func:`s4` is ``jpeft.compose`` of the existing methods, each restricted
to the layers of the groups that use it:

* Adapter: :func:`jpeft.methods.adapters.bottleneck` (default: Houlsby's two sequential adapters,
  after the attention output projection and after the FFN output projection) with
  ``layers_to_transform``;
* Prefix: :func:`jpeft.methods.prefix.prefix_tuning` with ``targets`` a regex of the attentions
  of those layers (:func:`layer_regex`);
* BitFit: :func:`jpeft.bitfit` with ``layers_to_transform`` (every bias inside those layers);
* LoRA: :func:`jpeft.lora` (default: query and value, ``alpha = r``, so ``s = 1``) with
  ``layers_to_transform``.

A strategy whose size (adapter bottleneck ``m``, LoRA rank ``r``) is the same in every group that
uses it is one part named after it (``"adapter"``, ``"prefix"``, ``"bitfit"``, ``"lora"``, in this
order); with sizes that differ by group it is one part per group (``"g1_adapter"``, ...). The
prefix length ``l`` is one number for the whole model: the prefix sits ahead of the tokens, which
therefore start at position ``l`` in every layer (``shift_positions``), so a single prefix part
covers all its groups. The parts never adapt the same weight (``compose`` checks it), and the
method's ``config`` is the composition's: :func:`jpeft.methods.from_config` rebuilds it.

**Spindle grouping** (:func:`spindle_groups`): group ``i`` gets about ``L w_i / sum(w)``
consecutive layers with ``w = (1, 2, 2, 1)`` (the ends half as deep as the middle; for ``G``
groups ``(1, 2, ..., 2, 1)``), rounded by largest remainder: ``L = 12 -> 2, 4, 4, 2``;
``24 -> 4, 8, 8, 4``; ``8 -> 1, 3, 3, 1``; ``6 -> 1, 2, 2, 1`` is the smallest four-group
spindle. The paper fixes the pattern (ends smaller than the middle); its exact per-group layer
counts could not be verified for this implementation, so the ratio is a documented default
(``weights``) and any grouping can be passed as ``groups``.

**Uniform allocation**: layer ``j`` of group ``g`` trains ``n_j = sum_{s in S_g} c_s(x_s)``
entries, the per-layer cost of each of its group's strategies at its size (Houlsby adapters
``2 (d_in m + m + m d + d)``; LoRA ``r (d_in + d_out)`` per adapted weight; prefix ``2 l K D``;
BitFit the layer's bias entries). With one size per strategy, layers of a group are equal but
groups differ (``G_3`` has three strategies). :func:`uniform_allocation` gives every layer about
the same budget ``B``: a group's fixed costs (BitFit, the prefix at the shared ``l``) are taken
from ``B`` and the rest is split equally between its sized strategies (adapter, LoRA), each size
rounded to the nearest integer, so ``|n_j - B| <= sum_s (c_s(x + 1) - c_s(x)) / 2`` over the
group's sized strategies. :func:`budget_report` counts a delta by layer and part to check it.

Layer-stacked (``scan``) models are not supported: groups select layers by the index in the
module path (``layers_to_transform``), which a stacked layer does not have.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib
from jpeft.methods import adapters as adapters_lib
from jpeft.methods import bitfit as bitfit_lib
from jpeft.methods import lora as lora_lib
from jpeft.methods import prefix as prefix_lib

ADAPTER, PREFIX, BITFIT, LORA = "adapter", "prefix", "bitfit", "lora"
#: The strategies, in the order of the paper's notation (A, P, B, L) and of the composed parts.
STRATEGIES = (ADAPTER, PREFIX, BITFIT, LORA)
_LETTERS = {"A": ADAPTER, "P": PREFIX, "B": BITFIT, "L": LORA}
#: The S4-model's assignment (Chen et al., 2023): ``G_1`` (A, L), ``G_2`` (A, P), ``G_3`` (A, P, B),
#: ``G_4`` (P, B, L).
PAPER_STRATEGIES = ((ADAPTER, LORA), (ADAPTER, PREFIX), (ADAPTER, PREFIX, BITFIT),
                    (PREFIX, BITFIT, LORA))
#: Query and value projections in Hugging Face naming (BERT ``query``/``value``, LLaMA
#: ``q_proj``/``v_proj``): LoRA's default targets.
QUERY_VALUE = r"(.*/)?(query|value|q_proj|v_proj)"
#: The attention scope (the one with the ``context`` hook point) inside a layer: BERT
#: ``attention/self``, LLaMA ``self_attn``.
ATTENTION = r"(?:attention/self|self_attn)"
#: Houlsby et al.'s placements: after the attention and after the FFN output projections.
HOULSBY = (adapters_lib.ATTENTION_SEQUENTIAL, adapters_lib.FFN_SEQUENTIAL)
#: Strategies with a size the budget can set (adapter bottleneck, LoRA rank).
SIZED = (ADAPTER, LORA)


# --------------------------------------------------------------------------------------------
# layer grouping


def spindle_groups(num_layers: int, groups: int = 4, *,
                   weights: Sequence[float] | None = None) -> tuple[tuple[int, ...], ...]:
    """Layers ``0 .. num_layers - 1`` in ``groups`` spindle-shaped runs of consecutive layers.

    Group ``i`` holds ``n_i`` layers, ``n_i ~ num_layers * w_i / sum(w)``: the integer parts, plus
    one layer for each of the largest fractional remainders (ties: the larger weight, then the
    earlier group). Default ``w = (1, 2, ..., 2, 1)``: the end groups half as deep as the middle
    ones, e.g. ``12 -> (2, 4, 4, 2)`` layers, ``24 -> (4, 8, 8, 4)``, ``8 -> (1, 3, 3, 1)``.

    Args:
      num_layers: ``L``.
      groups: ``G >= 3`` (a spindle needs a middle).
      weights: ``G`` positive relative depths, rising to a maximum and falling after it, with both
        ends strictly below the maximum.

    Returns the layer indices of each group, ``((0, ..), (.., ..), ...)``.

    Raises:
      ValueError: a bad ``groups`` or ``weights``, or too few layers for every group to have one
        and for both end groups to be smaller than their inner neighbours (for the default
        four groups: ``L >= 6``).
    """
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 3:
        raise ValueError(f"spindle_groups: a spindle needs at least 3 groups (ends smaller than "
                         f"the middle), got groups={groups!r}")
    if not isinstance(num_layers, (int, np.integer)) or isinstance(num_layers, bool):
        raise ValueError(f"spindle_groups: num_layers must be an int, got {num_layers!r}")
    w = tuple(float(x) for x in (weights if weights is not None
                                 else (1,) + (2,) * (groups - 2) + (1,)))
    if len(w) != groups or min(w) <= 0:
        raise ValueError(f"spindle_groups: weights must be {groups} positive numbers, got "
                         f"{weights!r}")
    top = w.index(max(w))
    rising = all(a <= b for a, b in zip(w[:top], w[1:top + 1]))
    falling = all(a >= b for a, b in zip(w[top:], w[top + 1:]))
    if not (rising and falling and w[0] < max(w) and w[-1] < max(w)):
        raise ValueError(f"spindle_groups: weights {w} are not spindle-shaped (rising to a "
                         f"maximum, then falling, both ends below it)")
    sizes = _spindle_sizes(num_layers, w)
    if sizes is None:
        need = next(n for n in range(groups, 1000 * groups) if _spindle_sizes(n, w))
        raise ValueError(f"spindle_groups: {num_layers} layers are too few for a {groups}-group "
                         f"spindle with weights {w} (every group needs a layer and both end "
                         f"groups fewer layers than their neighbours); it needs at least {need}")
    out, start = [], 0
    for n in sizes:
        out.append(tuple(range(start, start + n)))
        start += n
    return tuple(out)


def _spindle_sizes(num_layers: int, w: tuple[float, ...]) -> list[int] | None:
    """Largest-remainder apportionment of ``num_layers`` by ``w``; ``None`` if not a spindle."""
    ideal = [num_layers * x / sum(w) for x in w]
    sizes = [math.floor(x) for x in ideal]
    order = sorted(range(len(w)), key=lambda i: (-(ideal[i] - sizes[i]), -w[i], i))
    for i in order[:num_layers - sum(sizes)]:
        sizes[i] += 1
    if min(sizes) < 1 or not (sizes[0] < sizes[1] and sizes[-1] < sizes[-2]):
        return None
    return sizes


def _check_groups(groups: Sequence[Sequence[int]], num_layers: int
                  ) -> tuple[tuple[int, ...], ...]:
    out = tuple(tuple(int(i) for i in g) for g in groups)
    seen: dict[int, int] = {}
    for gi, g in enumerate(out):
        if not g:
            raise ValueError(f"s4: group G{gi + 1} holds no layer")
        for i in g:
            if not 0 <= i < num_layers:
                raise ValueError(f"s4: layer {i} of G{gi + 1} is outside 0 .. {num_layers - 1}")
            if i in seen:
                raise ValueError(f"s4: layer {i} is in both G{seen[i] + 1} and G{gi + 1}")
            seen[i] = gi
    return out


def _check_strategies(strategies: Sequence[Sequence[str]], n_groups: int
                      ) -> tuple[tuple[str, ...], ...]:
    if len(strategies) != n_groups:
        raise ValueError(f"s4: {n_groups} groups but {len(strategies)} strategy sets; give one "
                         f"(possibly empty: a frozen group) per group")
    out = []
    for gi, ss in enumerate(strategies):
        if isinstance(ss, str):       # a name, or letters: "APB" = (adapter, prefix, bitfit)
            ss = (ss,) if ss in STRATEGIES or not set(ss) <= set(_LETTERS) else tuple(ss)
        names = tuple(_LETTERS.get(s, s) for s in ss)
        bad = [s for s in names if s not in STRATEGIES]
        if bad:
            raise ValueError(f"s4: unknown strategy {bad} for G{gi + 1}; known: "
                             f"{list(STRATEGIES)} (or their letters A, P, B, L)")
        if len(set(names)) != len(names):
            raise ValueError(f"s4: G{gi + 1} lists a strategy twice: {names}")
        out.append(tuple(s for s in STRATEGIES if s in names))
    return tuple(out)


def _per_group(value: Any, n_groups: int, what: str) -> tuple:
    """An int (the same for every group) or one entry per group (``None`` where unused)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_groups:
            raise ValueError(f"s4: {what} needs one entry per group ({n_groups}), got {value!r}")
        return tuple(value)
    return (value,) * n_groups


def _positive_int(v: Any, what: str) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"s4: {what} must be a positive int, got {v!r}")
    return int(v)


# --------------------------------------------------------------------------------------------
# the parts


def layer_regex(layers: Sequence[int], scope: str = ATTENTION,
                layers_pattern: str | None = None) -> str:
    """A module-path regex (:mod:`jpeft.core.paths`) for the scopes ``scope`` inside the layers
    ``layers``, reading the layer index as :func:`jpeft.core.paths.layer_index` does: the first path
    component ending in an integer (``layer/3``, ``layers_3``) or, with ``layers_pattern``, the
    component after one named ``layers_pattern`` (or ``<layers_pattern>_<int>``).

    ``layer_regex([0, 5])`` matches ``bert/encoder/layer/5/attention/self`` and
    ``model/layers/0/self_attn``, not ``.../layer/15/...``."""
    alts = "|".join(str(int(i)) for i in sorted(set(layers)))
    if layers_pattern is None:
        head = rf"(?:[^/]*[^/0-9]/)*(?:[^/]*[^/0-9])?(?:{alts})"
    else:
        p = re.escape(layers_pattern)
        head = rf"(?:[^/]+/)*?(?:{p}/|{p}[_.-]?)(?:{alts})"
    return rf"{head}/(?:[^/]+/)*{scope}"


class _Options(NamedTuple):
    adapter_placements: tuple
    lora_targets: Any
    lora_alpha: float | None
    prefix_attention: str
    prefix_targets: Callable[[Sequence[int]], paths_lib.Targets] | None
    bitfit_targets: paths_lib.Targets
    bitfit_exclude: paths_lib.Targets
    layers_pattern: str | None
    adapter_kwargs: dict
    prefix_kwargs: dict
    lora_kwargs: dict


_RESERVED = {
    ADAPTER: ("placements", "bottleneck_size", "layers_to_transform", "layers_pattern", "name"),
    PREFIX: ("num_virtual_tokens", "targets", "name"),
    LORA: ("targets", "rank", "alpha", "layers_to_transform", "layers_pattern"),
}


def _strategy(strategy: str, size: int | None, layers: Sequence[int], opts: _Options,
              name: str) -> method_lib.Method:
    """One existing method, restricted to ``layers``."""
    layers = sorted(int(i) for i in layers)
    if strategy == ADAPTER:
        return adapters_lib.bottleneck(opts.adapter_placements, bottleneck_size=size,
                                       layers_to_transform=layers,
                                       layers_pattern=opts.layers_pattern, name=name,
                                       **opts.adapter_kwargs)
    if strategy == PREFIX:
        targets = (opts.prefix_targets(layers) if opts.prefix_targets is not None
                   else layer_regex(layers, opts.prefix_attention, opts.layers_pattern))
        return prefix_lib.prefix_tuning(size, targets, name=name, **opts.prefix_kwargs)
    if strategy == LORA:
        alpha = float(size) if opts.lora_alpha is None else opts.lora_alpha
        return lora_lib.lora(opts.lora_targets, rank=size, alpha=alpha,
                             layers_to_transform=layers, layers_pattern=opts.layers_pattern,
                             **opts.lora_kwargs)
    return bitfit_lib.bitfit(opts.bitfit_targets, layers_to_transform=layers,
                             layers_pattern=opts.layers_pattern, exclude=opts.bitfit_exclude)


def _options(*, adapter_placements, lora_targets, lora_alpha, prefix_attention, prefix_targets,
             bitfit_targets, bitfit_exclude, layers_pattern, adapter_kwargs, prefix_kwargs,
             lora_kwargs) -> _Options:
    kw = {ADAPTER: dict(adapter_kwargs or {}), PREFIX: dict(prefix_kwargs or {}),
          LORA: dict(lora_kwargs or {})}
    for s, given in kw.items():
        clash = sorted(set(given) & set(_RESERVED[s]))
        if clash:
            raise ValueError(f"s4: {s}_kwargs may not set {clash}: S4 sets them per group (use "
                             f"the s4 arguments instead)")
    placements = tuple(adapter_placements)
    if not placements:
        raise ValueError("s4: adapter_placements is empty")
    return _Options(placements, lora_targets, lora_alpha, prefix_attention, prefix_targets,
                    bitfit_targets, bitfit_exclude, layers_pattern, kw[ADAPTER], kw[PREFIX],
                    kw[LORA])


def _sizes(strategies, adapter_size, prefix_length, lora_rank) -> dict[str, tuple]:
    """Per strategy, the size of each group that uses it (``None`` elsewhere)."""
    n = len(strategies)
    if isinstance(prefix_length, (list, tuple)):
        raise ValueError("s4: prefix_length is one int for the whole model (the tokens' positions "
                         "shift by l in every layer); per-group sizes are for adapter_size and "
                         "lora_rank")
    given = {ADAPTER: _per_group(adapter_size, n, "adapter_size"),
             PREFIX: (prefix_length,) * n, BITFIT: (None,) * n,
             LORA: _per_group(lora_rank, n, "lora_rank")}
    what = {ADAPTER: "adapter_size", PREFIX: "prefix_length", LORA: "lora_rank"}
    out = {}
    for s in STRATEGIES:
        out[s] = tuple(
            (None if s == BITFIT else _positive_int(given[s][g], f"{what[s]} of G{g + 1}"))
            if s in strategies[g] else None for g in range(n))
    return out


def s4(num_layers: int, *, groups: Sequence[Sequence[int]] | None = None,
       strategies: Sequence[Sequence[str]] = PAPER_STRATEGIES,
       adapter_size: int | Sequence[int | None] = 16, prefix_length: int = 10,
       lora_rank: int | Sequence[int | None] = 8, lora_alpha: float | None = None,
       adapter_placements: Sequence[adapters_lib.Placement] = HOULSBY,
       lora_targets: paths_lib.Targets | str = QUERY_VALUE,
       prefix_attention: str = ATTENTION,
       prefix_targets: Callable[[Sequence[int]], paths_lib.Targets] | None = None,
       bitfit_targets: paths_lib.Targets = None, bitfit_exclude: paths_lib.Targets = (),
       layers_pattern: str | None = None, adapter_kwargs: Mapping[str, Any] | None = None,
       prefix_kwargs: Mapping[str, Any] | None = None,
       lora_kwargs: Mapping[str, Any] | None = None) -> method_lib.Method:
    """The S4-model (module docstring): ``jpeft.compose`` of Adapter, prefix, BitFit and LoRA, each
    on the layers of the groups it is assigned to.

    Args:
      num_layers: ``L``, the model's (unrolled) layers, indexed ``0 .. L - 1`` in module paths.
      groups: the layer indices of each group (default :func:`spindle_groups` ``(L)``).
      strategies: per group, the strategies it gets (names from :data:`STRATEGIES`, or the letters
        ``A, P, B, L``, also as one string: ``"APB"``; an empty set leaves the group frozen).
        Default :data:`PAPER_STRATEGIES`.
      adapter_size: the adapters' bottleneck ``m``: an int, or one per group (entries of groups
        without adapters ignored, ``None`` allowed).
      prefix_length: ``l``, shared by every prefixed layer.
      lora_rank: ``r``, an int or one per group.
      lora_alpha: LoRA's ``alpha`` (``s = alpha / r``); default ``alpha = r`` (``s = 1``) in every
        group.
      adapter_placements: where the adapters go (default Houlsby's two, :data:`HOULSBY`).
      lora_targets: the weights LoRA adapts (default query and value, :data:`QUERY_VALUE`).
      prefix_attention: regex of the attention scope inside a layer (:data:`ATTENTION`), joined to
        the layer selection by :func:`layer_regex`.
      prefix_targets: ``layers -> targets`` of the prefix (overrides ``prefix_attention``), for
        names :func:`layer_regex` does not fit.
      bitfit_targets, bitfit_exclude: which biases of a BitFit layer train (default every bias in
        it, LayerNorm's included).
      layers_pattern: the name of the layer container (``"layer"``, ``"layers"``, ``"h"``) when the
        first integer in a path is not the layer index.
      adapter_kwargs, prefix_kwargs, lora_kwargs: further arguments of the parts
        (``activation``, ``reparametrize``, ``dropout``, ...).

    Raises:
      ValueError: bad groups (overlapping, out of range, empty), strategies or sizes; (at
        ``init``) a part that matches nothing in its layers (e.g. BitFit on a model without biases).
    """
    if groups is None:
        groups = spindle_groups(num_layers)
    groups = _check_groups(groups, num_layers)
    strategies = _check_strategies(strategies, len(groups))
    if not any(strategies):
        raise ValueError("s4: every group is frozen; assign at least one strategy")
    opts = _options(adapter_placements=adapter_placements, lora_targets=lora_targets,
                    lora_alpha=lora_alpha, prefix_attention=prefix_attention,
                    prefix_targets=prefix_targets, bitfit_targets=bitfit_targets,
                    bitfit_exclude=bitfit_exclude, layers_pattern=layers_pattern,
                    adapter_kwargs=adapter_kwargs, prefix_kwargs=prefix_kwargs,
                    lora_kwargs=lora_kwargs)
    sizes = _sizes(strategies, adapter_size, prefix_length, lora_rank)
    parts: dict[str, method_lib.Method] = {}
    for s in STRATEGIES:
        users = [g for g in range(len(groups)) if s in strategies[g]]
        if not users:
            continue
        if len({sizes[s][g] for g in users}) == 1:
            layers = [i for g in users for i in groups[g]]
            parts[s] = _strategy(s, sizes[s][users[0]], layers, opts, s)
        else:
            for g in users:
                name = f"g{g + 1}_{s}"
                parts[name] = _strategy(s, sizes[s][g], groups[g], opts, name)
    return method_lib.compose(**parts)


# --------------------------------------------------------------------------------------------
# uniform allocation and the per-layer budget


class Budget(NamedTuple):
    """Trainable entries of a delta by layer: ``per_layer[j][part]``, ``totals[j]`` (sum over the
    parts), and ``outside[part]`` for entries in no layer (e.g. a reparametrised prefix's MLP)."""
    per_layer: dict[int, dict[str, int]]
    totals: dict[int, int]
    outside: dict[str, int]


def budget_report(delta: Mapping[str, Any], *, layers_pattern: str | None = None) -> Budget:
    """The trainable entries of a composed ``delta`` (``{part: tree}``) in each layer, by the layer
    index of each leaf's path (:func:`jpeft.core.paths.layer_index`). Works on an abstract delta
    (``jax.eval_shape``)."""
    per_layer: dict[int, dict[str, int]] = {}
    outside: dict[str, int] = {}
    for part, tree in delta.items():
        for path, leaf in paths_lib.flatten(tree).items():
            n = int(np.prod(np.shape(leaf)))
            j = paths_lib.layer_index(path, layers_pattern)
            if j is None:
                outside[part] = outside.get(part, 0) + n
            else:
                row = per_layer.setdefault(j, {})
                row[part] = row.get(part, 0) + n
    per_layer = dict(sorted(per_layer.items()))
    return Budget(per_layer, {j: sum(r.values()) for j, r in per_layer.items()}, outside)


def _cost(method: method_lib.Method, params: Any, sites: sites_lib.Sites) -> int:
    shapes = jax.eval_shape(lambda p: method.init(jax.random.key(0), p, sites), params)
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def uniform_allocation(params: Any, sites: sites_lib.Sites, num_layers: int,
                       budget_per_layer: int, *, groups: Sequence[Sequence[int]] | None = None,
                       strategies: Sequence[Sequence[str]] = PAPER_STRATEGIES,
                       prefix_length: int = 10, **options: Any) -> dict[str, tuple]:
    """Per-group adapter bottlenecks and LoRA ranks that give every layer about
    ``budget_per_layer`` trainable entries (the paper's uniform allocation).

    For group ``g``: ``F_g`` = the per-layer cost of its fixed strategies (BitFit; prefix at the
    shared ``prefix_length``); each of its ``k_g`` sized strategies ``s`` (adapter, LoRA), whose
    per-layer cost is ``a_s x + b_s`` in its size ``x``, gets
    ``x_s = round(((B - F_g) / k_g - b_s) / a_s)`` (a group with neither keeps its fixed cost).
    Costs are measured on the model
    (``jax.eval_shape`` of each part's ``init`` on the group's layers, averaged per layer), so
    they hold for any naming the options describe.

    Args:
      params, sites: the model (:func:`jpeft.probe`).
      num_layers, groups, strategies, prefix_length, options: as :func:`s4` (``options``: its
        keyword arguments other than the sizes).
      budget_per_layer: ``B``.

    Returns ``{"adapter_size": (..), "lora_rank": (..)}``, one entry per group (``None`` where the
    strategy is unused): ``s4(num_layers, groups=groups, strategies=strategies,
    prefix_length=prefix_length, **options, **uniform_allocation(...))`` is the S4-model.

    Raises:
      ValueError: ``B`` too small for some group to give each sized strategy a size of at least 1
        (the message gives about the smallest ``B`` that works), or sizes passed in ``options``.
    """
    if "adapter_size" in options or "lora_rank" in options:
        raise ValueError("uniform_allocation: adapter_size and lora_rank are what it computes; "
                         "do not pass them")
    B = _positive_int(budget_per_layer, "budget_per_layer")
    if groups is None:
        groups = spindle_groups(num_layers)
    groups = _check_groups(groups, num_layers)
    strategies = _check_strategies(strategies, len(groups))
    fields = set(_Options._fields)
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"uniform_allocation: unknown options {unknown}")
    defaults = dict(adapter_placements=HOULSBY, lora_targets=QUERY_VALUE, lora_alpha=None,
                    prefix_attention=ATTENTION, prefix_targets=None, bitfit_targets=None,
                    bitfit_exclude=(), layers_pattern=None, adapter_kwargs=None,
                    prefix_kwargs=None, lora_kwargs=None)
    opts = _options(**{**defaults, **options})
    prefix_length = _positive_int(prefix_length, "prefix_length")
    out: dict[str, list] = {"adapter_size": [None] * len(groups), "lora_rank": [None] * len(groups)}
    key = {ADAPTER: "adapter_size", LORA: "lora_rank"}
    for g, (layers, ss) in enumerate(zip(groups, strategies)):
        def per_layer(s, x, layers=layers):
            return _cost(_strategy(s, x, layers, opts, s), params, sites) / len(layers)
        fixed = sum(per_layer(s, prefix_length if s == PREFIX else None)
                    for s in ss if s not in SIZED)
        sized = [s for s in ss if s in SIZED]
        if not sized:
            continue
        share = (B - fixed) / len(sized)
        lines = {}
        for s in sized:
            c1, c2 = per_layer(s, 1), per_layer(s, 2)
            lines[s] = (c2 - c1, 2 * c1 - c2)                  # cost = a x + b
        for s in sized:
            a, b = lines[s]
            x = math.floor((share - b) / a + 0.5)            # nearest, halves up
            if x < 1:
                need = math.ceil(fixed + len(sized) * max(0.5 * a_ + b_
                                                          for a_, b_ in lines.values()))
                raise ValueError(f"uniform_allocation: a budget of {B} per layer leaves G{g + 1} "
                                 f"({', '.join(ss)}) {B - fixed:g} after its fixed strategies, "
                                 f"too little for a {s} of size 1 ({a + b:g} per layer); this "
                                 f"group needs a budget of at least about {need}")
            out[key[s]][g] = x
    return {k: tuple(v) for k, v in out.items()}
