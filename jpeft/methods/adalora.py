"""AdaLoRA (Zhang et al., 2023, arXiv 2303.10512): LoRA in SVD form with an adaptive rank budget.

For each adapted weight ``W0: [in, out]`` (Flax layout)::

    W = W0 + s * P diag(lam) Q,   P: [in, r], lam: [r], Q: [r, out],   s = alpha / r

(any other weight: the input, output and stacked axes of its contraction, as LoRA's factors; each
slice of a stacked weight is a matrix with its own triplets).

``lam`` starts at zero (training starts at the base model); ``P`` and ``Q`` are Gaussian (std 0.02,
as Hugging Face PEFT). ``r = init_r`` triplets ``(P[:, k], lam[k], Q[k, :])`` per matrix compete for
a *global* budget ``b(t)`` of triplets over all matrices:

* sensitivity of an entry ``I = |w * dL/dw|``; smoothed ``I_bar = b1 I_bar + (1 - b1) I``;
  uncertainty ``U_bar = b2 U_bar + (1 - b2) |I - I_bar|`` (with the new ``I_bar``); score
  ``s = I_bar * U_bar``;
* importance of triplet ``k``: ``S_k = s(lam_k) + mean_j s(P_jk) + mean_j s(Q_kj)``;
* budget (steps numbered ``t = 1 .. T``): ``b0 = init_r * n`` for ``t <= t_i``;
  ``b_T + (b0 - b_T) (1 - (t - t_i) / (T - t_i - t_f))^3`` (truncated to an integer, as Hugging
  Face) for ``t_i < t < T - t_f``; ``b_T = target_r * n`` from ``t = T - t_f`` on;
* every ``delta_T`` steps in the decay phase, ``lam`` of the triplets outside the global top-``b(t)``
  is set to zero; they keep receiving gradients and can come back. At ``t = T - t_f`` the top-``b_T``
  pattern is fixed and enforced at every later step.

The paper writes the decay in ``t - t_i`` (so does Hugging Face PEFT); ``shared/METHODS.md`` writes
``t - t_i - t_f``, which would start the decay above ``b0``: we follow the paper.

The allocation is optimizer-side state: :func:`adalora_optimizer` wraps any optax optimizer into a
``GradientTransformation`` that updates the importance EMAs from the raw gradients, runs the inner
optimizer, and then zeroes the masked ``lam`` entries through the update. The orthogonality
regulariser ``gamma * mean_k (||P_k^T P_k - I||_F^2 + ||Q_k Q_k^T - I||_F^2)`` is a function the loss
adds (:func:`orthogonality_penalty`; the paper's squared norms, averaged over matrices as Hugging
Face does so that ``orth_reg_weight = 0.5`` does not scale with the model).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.core import checks
from jpeft.core import contraction
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import precision
from jpeft.core import sites as sites_lib
from jpeft.methods import lora as lora_lib

P_NAME, E_NAME, Q_NAME = "lora_A", "lora_E", "lora_B"

#: Hugging Face PEFT's AdaLoraConfig defaults.
HF_DEFAULTS = {"init_r": 12, "target_r": 8, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5,
               "lora_alpha": 8, "tinit": 0, "tfinal": 0, "deltaT": 1}


def adalora(targets: paths_lib.Targets | str = ("query", "value"), init_r: int = 12,
            alpha: float = 8.0, *,
            layers_to_transform: int | Sequence[int] | None = None,
            layers_pattern: str | None = None, exclude: paths_lib.Targets = (),
            init_std: float = 0.02, target_r: int = 8, total_steps: int | None = None,
            t_init: int = 0, t_final: int = 0, delta_t: int = 1, beta1: float = 0.85,
            beta2: float = 0.85, orth_reg_weight: float = 0.5,
            orth_convention: str = "paper", dtype=None,
            compute_dtype=None) -> method_lib.Method:
    """AdaLoRA triplets on the contraction weights matched by ``targets`` (any rank).

    The method carries its training additions: ``method.penalty`` is the orthogonality
    regulariser (:func:`orthogonality_penalty` with ``orth_reg_weight`` and ``orth_convention``;
    ``orth_reg_weight=0`` drops it) and ``method.optimizer`` wraps any optax optimizer with the rank
    allocator (:func:`adalora_optimizer` with ``target_r``, ``total_steps``, ``t_init``,
    ``t_final``, ``delta_t``, ``beta1``, ``beta2``); :func:`jpeft.make_train_step` folds both in
    when given the method. ``total_steps`` is required for the allocator.

    The delta holds ``{"lora_A": P [*S, *I, r], "lora_E": lam [*S, r], "lora_B": Q [*S, r, *O]}``
    at each adapted weight's path, with the weight's stacked, input and output axes as in
    :mod:`jpeft.methods.lora` (``P [in, r]``, ``lam [r]``, ``Q [r, out]`` for a Dense kernel); each
    slice of a stacked weight is a matrix of its own, with its own triplets. Merge is exact:
    ``W0 + s * (P * lam) . Q``. Needs the model's sites (:func:`jpeft.probe`).
    """
    checks.positive_int("adalora", "init_r", init_r)
    checks.positive("adalora", "alpha", alpha)
    checks.positive("adalora", "init_std", init_std)
    checks.non_negative("adalora", "orth_reg_weight", orth_reg_weight)
    checks.unit_interval("adalora", "beta1", beta1)
    checks.unit_interval("adalora", "beta2", beta2)
    s = alpha / init_r
    sel, all_linear = lora_lib.selection(targets, layers_to_transform=layers_to_transform,
                                         layers_pattern=layers_pattern, exclude=exclude)

    def init(key, params, sites=None):
        chosen = lora_lib.select(params, sites, sel, all_linear, "adalora")
        flat = paths_lib.flatten(params)
        out = {}
        for i, path in enumerate(chosen.chosen):
            w = flat[path]
            layout = sites.layout(path, what="adalora")
            lora_lib.check_rank(init_r, w.shape, layout, path, "adalora", "init_r")
            p_axes, q_axes = contraction.low_rank_axes(layout)
            e_axes = tuple(layout.stack) + (None,)
            lay = chosen.layers.get(path)
            shape = lambda axes: lora_lib.sliced_shape(
                tuple(init_r if a is None else w.shape[a] for a in axes), axes, lay)
            kp, kq = jax.random.split(jax.random.fold_in(key, i))
            dd = precision.delta_dtype(layout.dtype or w.dtype, dtype)
            out[path] = {P_NAME: init_std * jax.random.normal(kp, shape(p_axes), dd),
                         E_NAME: jnp.zeros(shape(e_axes), dd),
                         Q_NAME: init_std * jax.random.normal(kq, shape(q_axes), dd)}
        return paths_lib.unflatten(out)

    def factors(params, delta, sites) -> dict:
        """``{weight path: {P, lam, Q}}`` as :class:`~jpeft.core.sites.Factor` (lam: stacked axes
        and the rank; stacked weights narrowed by ``layers_to_transform`` expanded to every
        layer)."""
        narrowed = lora_lib.stacked_layers(params, sites, sel, all_linear, "adalora")
        out = {}
        for path, t in triplets(delta).items():
            layout = sites.layout(path, what="adalora")
            p_axes, q_axes = contraction.low_rank_axes(layout)
            lay, n = narrowed.get(path, (None, 0))
            f = lambda v, axes: lora_lib.expand(sites_lib.Factor(v, axes), lay, n)
            out[path] = {P_NAME: f(t[P_NAME], p_axes),
                         E_NAME: f(t[E_NAME], tuple(layout.stack) + (None,)),
                         Q_NAME: f(t[Q_NAME], q_axes)}
        return out

    def scaled_p(fs) -> sites_lib.Factor:
        """``P * lam`` (lam broadcast over the input axes of ``P``)."""
        p, lam = fs[P_NAME], fs[E_NAME]
        n_in = p.value.ndim - lam.value.ndim
        lam_b = lam.value.reshape(lam.value.shape[:-1] + (1,) * n_in + lam.value.shape[-1:])
        return sites_lib.Factor(p.value * lam_b.astype(p.value.dtype), p.axes)

    def add(params, delta, sites, sign):
        flat = paths_lib.flatten(params)
        upd = {p: sign * s * contraction.outer(scaled_p(fs), fs[Q_NAME], flat[p].shape)
               for p, fs in factors(params, delta, sites).items()}
        return paths_lib.map_selected(lambda _, w, d: (w + d.astype(w.dtype)).astype(w.dtype),
                                      params, upd)

    merge = lambda params, delta, sites=None: add(params, delta, sites, 1.0)
    unmerge = lambda params, delta, sites=None: add(params, delta, sites, -1.0)

    def edit_fn(call, fs):
        x = call.x.astype(precision.compute_dtype(fs[P_NAME].value, compute_dtype))
        return call.y + (s * contraction.low_rank(call, x, scaled_p(fs), fs[Q_NAME])
                         ).astype(call.y.dtype)

    def weight_fn(w, fs, axes):
        d = s * contraction.outer(scaled_p(fs), fs[Q_NAME], w.shape, axes)
        return w + d.astype(w.dtype)

    def edits(params, delta, sites, context):
        if context.mode == "materialised":
            return sites_lib.Edits(merge(params, delta, sites))
        return sites_lib.Edits(params, {
            p: sites_lib.ContractionEdit(fs, edit_fn, weight=weight_fn, views=True)
            for p, fs in factors(params, delta, sites).items()})

    def allocator(inner):
        if total_steps is None:
            raise ValueError("adalora: the rank allocator needs total_steps (adalora(..., "
                             "total_steps=N)), the length of the training run it schedules")
        return adalora_optimizer(inner, total_steps=total_steps, init_r=init_r,
                                 target_r=target_r, t_init=t_init, t_final=t_final,
                                 delta_t=delta_t, beta1=beta1, beta2=beta2)

    if total_steps is not None:        # validate the schedule now, not at the first step
        budget_schedule(1, init_r=init_r, target_r=target_r, t_init=t_init, t_final=t_final,
                        delta_t=delta_t, total_steps=total_steps)
    orthogonality_penalty_args = dict(weight=orth_reg_weight, convention=orth_convention)
    if orth_convention not in ("paper", "hf"):
        raise ValueError(f"adalora: orth_convention must be 'paper' or 'hf', got {orth_convention!r}")
    config = {"method": "adalora", "targets": targets, "init_r": init_r, "alpha": float(alpha),
              "layers_to_transform": layers_to_transform,
              "layers_pattern": layers_pattern, "exclude": exclude, "init_std": init_std,
              "target_r": target_r, "total_steps": total_steps, "t_init": t_init,
              "t_final": t_final, "delta_t": delta_t, "beta1": beta1, "beta2": beta2,
              "orth_reg_weight": orth_reg_weight, "orth_convention": orth_convention,
              "scaling": s, **precision.config(dtype, compute_dtype)}
    return method_lib.Method(
        name="adalora", init=init, merge=merge, unmerge=unmerge, edits=edits,
        shardings=lambda ps, d, sites=None: lora_lib.factor_shardings(
            ps, d, sites, "adalora", layers_narrowed=layers_to_transform is not None),
        labels=method_lib.constant_labels("adalora"), config=config,
        penalty=(None if orth_reg_weight == 0 else
                 lambda d: orthogonality_penalty(d, **orthogonality_penalty_args)),
        optimizer=allocator)


def triplets(delta: Any) -> dict[paths_lib.Path, dict[str, jax.Array]]:
    """``{kernel_path: {"lora_A", "lora_E", "lora_B"}}`` for every AdaLoRA triplet set in ``delta``
    (anywhere in a composed delta). The optimizer state keys them by ``path_str(kernel_path)``."""
    flat = paths_lib.flatten(delta)
    return {p[:-1]: {n: flat[p[:-1] + (n,)] for n in (P_NAME, E_NAME, Q_NAME)}
            for p in flat if p[-1] == E_NAME}


def orthogonality_penalty(delta: Any, weight: float = 0.5, *, convention: str = "paper"
                          ) -> jax.Array:
    """The orthogonality regulariser over all adapted matrices ``k``.

    * ``convention="paper"``: ``weight * mean_k (||P_k^T P_k - I||_F^2 + ||Q_k Q_k^T - I||_F^2)``,
      the paper's squared norms, averaged over matrices;
    * ``convention="hf"``: Hugging Face PEFT's ``weight * mean over the 2n factors of
      ||P^T P - I||_F`` (and ``||Q Q^T - I||_F``), unsquared norms averaged over factors. With the
      default ``weight = 0.5`` and Gaussian(0.02) init this is about 6x smaller at the start.
    """
    if convention not in ("paper", "hf"):
        raise ValueError(f"orthogonality_penalty: convention must be 'paper' or 'hf', got {convention!r}")
    terms = []
    for t in triplets(delta).values():
        n_stack = t[E_NAME].ndim - 1
        r = t[E_NAME].shape[-1]
        p = t[P_NAME].astype(jnp.float32)
        p = p.reshape((int(np.prod(p.shape[:n_stack])), -1, r))            # [slices, in, r]
        q = t[Q_NAME].astype(jnp.float32)
        q = q.reshape((int(np.prod(q.shape[:n_stack])), r, -1))            # [slices, r, out]
        eye = jnp.eye(r, dtype=jnp.float32)
        sq_p = jnp.sum((jnp.einsum("nir,nis->nrs", p, p) - eye) ** 2, axis=(1, 2))
        sq_q = jnp.sum((jnp.einsum("nro,nso->nrs", q, q) - eye) ** 2, axis=(1, 2))
        terms += ([sq_p + sq_q] if convention == "paper" else [jnp.sqrt(sq_p), jnp.sqrt(sq_q)])
    if not terms:
        raise ValueError("orthogonality_penalty: the delta holds no AdaLoRA triplets")
    return weight * jnp.mean(jnp.concatenate(terms))


class BudgetSchedule(NamedTuple):
    """The cubic budget schedule; steps are numbered ``t = 1 .. total_steps``."""
    init_budget: int
    target_budget: int
    t_init: int
    t_final: int
    delta_t: int
    total_steps: int

    def budget(self, t):
        """``b(t)`` (works on Python ints and traced int arrays)."""
        b0, bt, ti, tf, total = (self.init_budget, self.target_budget, self.t_init, self.t_final,
                                 self.total_steps)
        frac = 1.0 - (t - ti) / (total - ti - tf)
        decay = jnp.floor((b0 - bt) * jnp.clip(frac, 0.0, 1.0) ** 3 + bt).astype(jnp.int32)
        return jnp.where(t <= ti, b0, jnp.where(t >= total - tf, bt, decay))

    def masks_at(self, t):
        """Whether the budget is enforced (by scores) at step ``t``."""
        ti, tf, total = self.t_init, self.t_final, self.total_steps
        return ((t > ti) & (t < total - tf) & (t % self.delta_t == 0)) | (t == total - tf)


def budget_schedule(num_matrices: int, *, init_r: int = 12, target_r: int = 8, t_init: int = 0,
                    t_final: int = 0, delta_t: int = 1, total_steps: int) -> BudgetSchedule:
    """Validated :class:`BudgetSchedule` for ``num_matrices`` adapted matrices."""
    if target_r > init_r:
        raise ValueError(f"adalora: target_r {target_r} is above init_r {init_r}")
    if target_r < 0:
        raise ValueError(f"adalora: target_r must be >= 0, got {target_r}")
    if delta_t < 1:
        raise ValueError(f"adalora: delta_T must be >= 1, got {delta_t}")
    if min(t_init, t_final) < 0 or t_init + t_final >= total_steps:
        raise ValueError(f"adalora: t_init ({t_init}) + t_final ({t_final}) must be smaller than "
                         f"total_steps ({total_steps}) and both >= 0")
    return BudgetSchedule(init_r * num_matrices, target_r * num_matrices, t_init, t_final, delta_t,
                          total_steps)


class AdaLoRAState(NamedTuple):
    """``count``: updates done; ``ipt``/``unc``: EMAs of sensitivity and uncertainty (trees like the
    triplets); ``pattern``: bool ``[*S, r]`` per weight, the kept triplets (fixed from ``T - t_f``);
    ``budget``: the budget of the last step; ``inner``: the wrapped optimizer's state."""
    count: jax.Array
    ipt: Any
    unc: Any
    pattern: Any
    budget: jax.Array
    inner: Any


def triplet_scores(ipt: dict, unc: dict) -> dict:
    """``S_k = s(lam_k) + mean_j s(P_jk) + mean_j s(Q_kj)`` with ``s = I_bar * U_bar``: ``[*S, r]``
    per weight (``[r]`` for an unstacked one); ``j`` runs over the input (output) axes."""
    out = {}
    for path in ipt:
        s = {n: ipt[path][n] * unc[path][n] for n in (P_NAME, E_NAME, Q_NAME)}
        n_stack = s[E_NAME].ndim - 1
        p_in = tuple(range(n_stack, s[P_NAME].ndim - 1))
        q_out = tuple(range(n_stack + 1, s[Q_NAME].ndim))
        out[path] = (s[E_NAME] + jnp.mean(s[P_NAME], axis=p_in)
                     + jnp.mean(s[Q_NAME], axis=q_out))
    return out


def _top_budget(scores: dict, budget) -> dict:
    """Bool masks keeping exactly the ``budget`` highest scores over all matrices (ties: first)."""
    order = list(scores)
    flat = jnp.concatenate([scores[p].reshape(-1) for p in order])
    rank = jnp.argsort(jnp.argsort(-flat, stable=True), stable=True)
    keep = rank < budget
    out, start = {}, 0
    for p in order:
        n = scores[p].size
        out[p] = keep[start:start + n].reshape(scores[p].shape)
        start += n
    return out


def adalora_optimizer(inner: optax.GradientTransformation, *, total_steps: int,
                      init_r: int = 12, target_r: int = 8, t_init: int = 0, t_final: int = 0,
                      delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85
                      ) -> optax.GradientTransformation:
    """Wrap ``inner`` with AdaLoRA's rank allocation (see the module docstring).

    ``update(grads, state, params)`` needs ``params`` (the current delta). Only the AdaLoRA triplets
    of the delta take part; other parts of a composed delta pass through ``inner`` unchanged.
    """
    checks.unit_interval("adalora", "beta1", beta1)
    checks.unit_interval("adalora", "beta2", beta2)

    def schedule_for(delta):
        n = sum(int(np.prod(t[E_NAME].shape[:-1])) for t in triplets(delta).values())
        if n == 0:
            raise ValueError("adalora_optimizer: the delta holds no AdaLoRA triplets")
        return budget_schedule(n, init_r=init_r, target_r=target_r, t_init=t_init,
                               t_final=t_final, delta_t=delta_t, total_steps=total_steps)

    def init(params):
        sched = schedule_for(params)
        trip = {paths_lib.path_str(p): t for p, t in triplets(params).items()}
        for path, t in trip.items():
            if t[E_NAME].shape[-1] != init_r:
                raise ValueError(f"adalora_optimizer: init_r={init_r} but "
                                 f"{path} has rank {t[E_NAME].shape[-1]}")
        zeros = jax.tree.map(jnp.zeros_like, trip)
        pattern = {p: jnp.ones(t[E_NAME].shape, bool) for p, t in trip.items()}
        return AdaLoRAState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, trip),
                            pattern, jnp.asarray(sched.init_budget, jnp.int32), inner.init(params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("adalora_optimizer needs params (the delta) in update()")
        sched = schedule_for(params)
        t = state.count + 1
        trip_p = {paths_lib.path_str(p): t for p, t in triplets(params).items()}
        trip_g = {paths_lib.path_str(p): t for p, t in triplets(grads).items()}
        keys = {paths_lib.path_str(p): p + (E_NAME,) for p in triplets(params)}
        tracking = t <= total_steps - t_final
        ipt, unc = {}, {}
        for path in trip_p:
            ipt[path], unc[path] = {}, {}
            for n in (P_NAME, E_NAME, Q_NAME):
                i_now = jnp.abs(trip_p[path][n] * trip_g[path][n]).astype(jnp.float32)
                i_bar = beta1 * state.ipt[path][n] + (1 - beta1) * i_now
                u_bar = beta2 * state.unc[path][n] + (1 - beta2) * jnp.abs(i_now - i_bar)
                ipt[path][n] = jnp.where(tracking, i_bar, state.ipt[path][n])
                unc[path][n] = jnp.where(tracking, u_bar, state.unc[path][n])

        budget = sched.budget(t)
        by_score = _top_budget(triplet_scores(ipt, unc), budget)
        scored, frozen = sched.masks_at(t), t > total_steps - t_final
        pattern = {p: jnp.where(scored, by_score[p], state.pattern[p]) for p in trip_p}
        enforce = scored | frozen

        updates, inner_state = inner.update(grads, state.inner, params)
        flat_u = paths_lib.flatten(updates)
        for path in trip_p:
            key = keys[path]
            lam = trip_p[path][E_NAME]
            u = flat_u[key]
            masked = jnp.where(pattern[path], u, -lam)           # lam + u -> 0 where dropped
            flat_u[key] = jnp.where(enforce, masked, u)
        updates = jax.tree_util.tree_unflatten(
            jax.tree_util.tree_structure(updates), list(flat_u.values()))
        return updates, AdaLoRAState(state.count + 1, ipt, unc, pattern, budget, inner_state)

    return optax.GradientTransformation(init, update)


def rank_pattern(delta: Any) -> dict[str, Any]:
    """Final rank of every adapted matrix: the number of non-zero ``lam`` entries, by path (a
    nested list with one count per slice for a stacked weight)."""
    out = {}
    for p, t in triplets(delta).items():
        counts = np.count_nonzero(np.asarray(t[E_NAME]), axis=-1)
        out[paths_lib.path_str(p)] = counts.tolist() if counts.ndim else int(counts)
    return out
