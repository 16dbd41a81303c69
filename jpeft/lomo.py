"""LOMO and AdaLomo: full-parameter fine-tuning with the update fused into the backward pass.

LOMO (Lv et al., 2023, "Full Parameter Fine-tuning for Large Language Models with Limited
Resources", arXiv 2306.09782) updates each parameter as soon as its gradient is complete and then
drops that gradient, so the gradient of the whole model is never alive at once. The update is SGD
with optional weight decay, gradient clipping and loss scaling; for a tensor ``p`` with complete
gradient ``G`` of the (scaled) loss::

    g  = G / s                                  (s: the loss scale, 1 without scaling)
    g  = clip(g, -clip_grad_value, clip_grad_value)          (optional)
    g  = g * min(1, clip_grad_norm / (||grad||_2 + 1e-6))   (optional; ||grad|| over all tensors)
    p <- p * (1 - lr * weight_decay) - lr * g

computed in float32 and cast back to ``p``'s dtype, as the ``lomo-optim`` package does.

AdaLomo (Lv et al., 2023, "AdaLomo: Low-memory Optimization with Adaptive Learning Rate",
arXiv 2310.10195) replaces SGD by an Adafactor-style adaptive step with grouped update
normalisation. At step ``t = 1, 2, ...`` (counted before the backward pass), for a tensor ``p``
with preprocessed gradient ``g`` (as above)::

    beta = 1 - t ** decay_rate                          (decay_rate = -0.8)
    u2   = g**2 + eps1                                  (eps1 = 1e-30)
    matrix  [..., m, n]:  r <- beta r + (1 - beta) mean(u2, axis=-1)          r: [..., m]
                          c <- beta c + (1 - beta) mean(u2, axis=-2)          c: [..., n]
                          v_hat = (r / mean(r, axis=-1))[..., :, None] * c[..., None, :]
    vector or scalar:     v <- beta v + (1 - beta) u2;   v_hat = v
    u    = g / sqrt(v_hat)
    u    = u / max(1, rms(u) / clip_threshold)          (grouped update normalisation)
    lr_t = lr * max(eps2, rms(p))                       (eps2 = 1e-3; rms over the tensor)
    p   <- p * (1 - lr_t * weight_decay) - lr_t * u

(``lomo_optim.AdaLomo``'s math; it stores ``[out, in]`` matrices and factors rows/columns of that
layout, which gives the same ``v_hat``: ``r_i c_j / mean(r) = c_j r_i / mean(c)``.) A parameter
with a leading layer axis that a layer scan slices (the ``nnx.scan``-stacked decoder, ``[L, ...]``)
is ``L`` tensors, as in the unrolled model: ``rms``, ``r``, ``c`` and ``v`` are per slice.

**How the update is fused, in JAX.** ``jax.grad`` does not expose a gradient before it returns the
whole tree, so the step differentiates a function whose "cotangents" *are* the updated
parameters:

* every trainable leaf enters the loss through a ``jax.custom_vjp`` identity (:func:`_tag`)
  whose backward rule receives the leaf's complete gradient (JAX sums all uses first) and
  returns, as the cotangent of the leaf's *sink* ``(p, optimizer state)``, the updated
  ``(p, state)``; ``jax.grad`` of the loss with respect to the sinks is then the new parameters
  and state. Under ``jax.jit`` with the parameters donated, XLA frees each gradient right after
  its update and writes the new value into the parameter's own buffer.
* a leaf whose only use is one operand of a ``dot_general`` (every kernel of an unrolled model,
  the LM head) is updated in that product's backward pass instead (:func:`_fused_dot`): the
  product's VJP gives the other operand's cotangent (``dx = dy W^T``, which reads the old
  weights) and the leaf's complete gradient, and the update is made to depend on ``dx``
  (exactly, as :func:`_after` does), so the write comes after every read, and the rest of the
  backward pass is made to wait for the update (:func:`_depending`), so the gradient is gone
  before the next layer's exists (left alone, XLA may defer an LM head's update to the end of
  the step, its gradient alive through every layer's). Updated at an identity,
  the write is unordered with that read and XLA keeps a copy of the weight through the step, as
  it does for plain SGD through :func:`jpeft.make_train_step` (a copy of every donated kernel;
  ``tests/test_lomo.py``, ``benchmarks/lomo_memory.py``).
* LOMO's rule is elementwise, so such a product's gradient is applied in pieces along the
  leaf's largest free axis (an LM head ``[hidden, vocab]``: columns of the vocabulary), each
  computed (``x^T ct[:, c]``) and applied in turn (:func:`_apply_in_pieces`, ``make_step``'s
  ``piece_bytes``): one piece's gradient is alive, not the head's.
* an LM head whose only use is :func:`jpeft.lm_cross_entropy` (the head and the loss computed
  together in vocabulary chunks) is updated chunk by chunk inside the loss's backward pass
  (:func:`_fused_lm_loss`): neither the logits' cotangent nor the head's gradient exists whole.
* a table whose only use is one ``gather`` (an embedding lookup) is updated in the lookup's
  backward pass (:func:`_fused_gather`). A row lookup's gradient is zero outside the rows looked
  up: LOMO keeps it as those rows (``[tokens, hidden]``, duplicates summed) and updates them
  in place, the other rows only decaying; no table-sized gradient exists. Otherwise (AdaLomo,
  whose moments see every row) the gradient is scattered into zeros created there: JAX's own
  transpose makes those zeros a constant, which XLA creates before the forward pass, a
  table-sized buffer alive through the whole step.
* a layer-stacked leaf ``[L, ...]`` that a ``scan`` over layers consumes as a scanned operand
  would get its gradient only as the stacked ``[L, ...]`` cotangent that the scan's transpose
  accumulates: the gradient buffer LOMO removes. Such a scan is replaced by a *fused scan*
  (:func:`_fused_scan`), a ``jax.custom_vjp`` around the scan. Its forward pass is the scan,
  keeping the residuals JAX's own differentiation keeps (the activations; residuals that are a
  loop constant or a weight slice are read again, those that depend on loop constants only are
  computed once outside the loop, those computed from a weight slice alone, e.g. its cast to a
  lower compute dtype, are recomputed from the slice). Its backward pass is a reverse scan that
  carries the stacked parameter (and optimizer-state) buffers themselves: at layer ``l`` it
  reads ``p[l]`` (not yet updated), runs the layer's VJP, and updates slice ``l`` in place
  (``p[l] *= decay; p[l] -= step``). The write is made to depend on every output of the VJP
  (:func:`_after`), so XLA orders it after the VJP's reads of the same weights and updates the
  carried buffer in place instead of copying it. The stacked gradient never exists; one
  layer's does.

The loss function is traced to a jaxpr (``jax.make_jaxpr``) and evaluated again equation by
equation inside ``jax.grad``; this is how the scans are found (a stacked leaf fed, possibly
through nested ``jit`` s and same-type casts or copies, as a scanned operand of a ``scan``, and
used nowhere else) and replaced. Everything else is bound unchanged (a ``jit`` on the way to a
fused scan is inlined). A stacked leaf that is also used elsewhere, or whose scan sits inside
another higher-order primitive (a ``remat`` around the whole scan, a ``cond``), is updated at
its identity from its whole gradient: correct, but that leaf's gradient is then whole.
:func:`plan` reports which leaves go which way.

**Global-norm clipping and dynamic loss scaling** need the gradient norm before any update: a
first backward pass differentiates the same loss with respect to one float32 pair per leaf,
``(sum of squared unscaled gradient entries, count of non-finite entries)``, through the same
identities and fused scans (no gradient tree either), then the update pass runs with the clip
coefficient (its backward seeded so that XLA cannot merge the two passes into one that keeps
every gradient; the forward passes may be computed once, as ``lomo-optim``'s ``retain_graph``).
A non-finite gradient skips the update whenever this pass runs: parameters and optimizer state
come out unchanged (``metrics["overflow"]``) and the dynamic scale shrinks; ``window`` clean
steps grow it (``lomo_optim.DynamicLossScaler``'s rule; lomo-optim itself only applies the
shrink). Without a first pass nothing can be skipped: the updates happen during the only
backward pass.

**Semantics to know.** A trainable leaf that the loss never uses gets no update, not even weight
decay (as in ``lomo-optim``, whose hooks fire only for parameters that receive a gradient). A leaf
used several times (a tied embedding) is updated once with its complete gradient (``lomo-optim``
updates it once per partial gradient). Only floating-point leaves can be trained: a tree with an
integer leaf is refused. The forward pass sees the parameters of this step for every layer
(updates are applied in the backward pass only), so the result equals SGD/AdaLomo on the same
batch exactly, up to floating-point rounding.

Usage (any pytree of parameters: the whole model, or :func:`jpeft.full_finetune`'s delta with the
frozen rest passed as an argument)::

    opt   = jpeft.lomo.lomo(1e-3, weight_decay=0.01, clip_grad_norm=1.0)
    step  = jpeft.lomo.make_step(loss_fn, opt)       # loss_fn(params, *args) -> scalar
    state = step.init(params, *args)
    params, state, metrics = step(params, state, *args)   # params and state donated
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jpeft import lm_loss
from jpeft.core import compat
from jpeft.core import paths as paths_lib
from jpeft.core import xla_options

f32 = jnp.float32
SymbolicZero = jax.custom_derivatives.SymbolicZero


# --------------------------------------------------------------------------------------------
# Configuration and state


class DynamicLossScale(NamedTuple):
    """Dynamic loss scaling (for float16/bfloat16 parameters), ``lomo_optim.DynamicLossScaler``'s
    parameters and defaults.

    The loss is multiplied by ``scale`` before the backward passes and every gradient divided by
    it. An overflow (a non-finite gradient entry, seen in the first pass) skips the step; then,
    if ``hysteresis`` overflows have been seen since the last growth (1: every overflow),
    ``scale <- max(scale / factor, min_scale)``. After every ``window`` steps counted since the
    last overflow the scale grows, ``scale <- scale * factor``. (``lomo-optim`` raises once an
    overflow happens at ``min_scale``; a compiled step cannot raise: the step is skipped and
    ``metrics["overflow"]`` says so.)
    """
    init_scale: float = 2.0 ** 32
    factor: float = 2.0
    window: int = 1000
    min_scale: float = 1.0
    hysteresis: int = 1


class LossScaleState(NamedTuple):
    """``scale``: the current loss scale (float32); ``since_overflow``: steps since the last
    overflow, counting this one (``lomo-optim``'s ``cur_iter - last_overflow_iter``, 1 at the
    start); ``hysteresis``: overflows left before the next shrink."""
    scale: jax.Array
    since_overflow: jax.Array
    hysteresis: jax.Array


class LomoState(NamedTuple):
    """``count``: updates applied (skipped steps not counted); ``loss_scale``: the
    :class:`LossScaleState` under dynamic loss scaling, else ``None``."""
    count: jax.Array
    loss_scale: LossScaleState | None


class Factored(NamedTuple):
    """AdaLomo's second moment of a matrix ``[..., m, n]``: ``row`` ``[..., m]`` (mean over the
    last axis), ``col`` ``[..., n]`` (mean over the one before); with a leading ``[L]`` for a
    layer-stacked leaf."""
    row: jax.Array
    col: jax.Array


class Full(NamedTuple):
    """AdaLomo's second moment of a vector or scalar, one entry per parameter entry."""
    v: jax.Array


class AdaLomoState(NamedTuple):
    """``count`` and ``loss_scale`` as :class:`LomoState`; ``moments``: a tree like the
    parameters with a :class:`Factored` or :class:`Full` per leaf (float32)."""
    count: jax.Array
    loss_scale: LossScaleState | None
    moments: Any


class Hyper(NamedTuple):
    """The scalars one update reads (float32): learning rate, ``1 / loss scale``, global-norm
    clip coefficient, ``skip`` (1.0 when the step is skipped), AdaLomo's ``beta``."""
    lr: jax.Array
    inv_scale: jax.Array
    clip_coef: jax.Array
    skip: jax.Array
    beta: jax.Array


@dataclasses.dataclass(frozen=True)
class FusedOptimizer:
    """An optimizer whose update runs inside the backward pass (:func:`lomo`, :func:`adalomo`).

    Attributes:
      name: ``"lomo"`` or ``"adalomo"``.
      learning_rate: a float or an optax-style schedule ``count -> lr``.
      weight_decay, clip_grad_norm, clip_grad_value, loss_scale: as in :func:`lomo`.
      eps, clip_threshold, decay_rate: AdaLomo's (:func:`adalomo`).
    """
    name: str
    learning_rate: float | Callable[[jax.Array], jax.Array]
    weight_decay: float = 0.0
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    loss_scale: float | DynamicLossScale | None = None
    eps: tuple[float, float] = (1e-30, 1e-3)
    clip_threshold: float = 1.0
    decay_rate: float = -0.8

    @property
    def dynamic(self) -> bool:
        return isinstance(self.loss_scale, DynamicLossScale)

    @property
    def needs_norm_pass(self) -> bool:
        """Whether a step runs the first (gradient-norm) backward pass: global-norm clipping or
        dynamic loss scaling (its overflow check)."""
        return self.clip_grad_norm is not None or self.dynamic

    def init(self, params: Any, stacked: Any = ()) -> LomoState | AdaLomoState:
        """The optimizer state for ``params``.

        ``stacked``: paths (tuples of strings, as :func:`jpeft.core.paths.flatten` gives, or
        ``"a/b/c"`` strings) of leaves whose leading axis is a layer axis (AdaLomo keeps their
        moments per slice). :meth:`FusedStep.init` fills it from the loss function's program;
        LOMO has no per-leaf state and ignores it.

        Raises:
          ValueError: a leaf of ``params`` is not a floating-point array.
        """
        _check_float(params)
        count = jnp.zeros((), jnp.int32)
        ls = None
        if self.dynamic:
            cfg = self.loss_scale
            ls = LossScaleState(jnp.asarray(cfg.init_scale, f32), jnp.ones((), jnp.int32),
                                jnp.asarray(cfg.hysteresis, jnp.int32))
        if self.name == "lomo":
            return LomoState(count, ls)
        stacked = {_as_path(s) for s in stacked}
        flat = paths_lib.flatten(params)
        unknown = stacked - set(flat)
        if unknown:
            raise ValueError(f"adalomo.init: stacked paths {sorted(unknown)} are not leaves of "
                             f"params")
        moments = jax.tree_util.tree_map_with_path(
            lambda kp, p: _moment_init(p, paths_lib.to_path(kp) in stacked), params)
        return AdaLomoState(count, ls, moments)


def lomo(learning_rate: float | Callable[[jax.Array], jax.Array], *, weight_decay: float = 0.0,
         clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
         loss_scale: float | DynamicLossScale | None = None) -> FusedOptimizer:
    """LOMO: SGD fused into the backward pass (module docstring for the math).

    Args:
      learning_rate: float, or a schedule ``count -> lr`` (``count``: updates applied so far).
      weight_decay: decoupled decay, ``p <- p * (1 - lr * weight_decay)`` before the step.
      clip_grad_norm: clip by the global gradient norm (a first backward pass computes it).
      clip_grad_value: clamp every gradient entry to ``[-v, v]`` (per tensor, no extra pass).
      loss_scale: ``None``; a float (a static scale: loss times it, gradients divided by it);
        or :class:`DynamicLossScale` (overflow check in a first pass, skipped steps).
        ``lomo-optim`` switches dynamic scaling on by itself for a float16 loss (and then sets
        ``clip_grad_norm=1.0`` when unset); here it is asked for.

    Returns:
      a :class:`FusedOptimizer`; :func:`make_step` builds the train step.
    """
    _check_config(clip_grad_norm, clip_grad_value, loss_scale)
    return FusedOptimizer("lomo", learning_rate, weight_decay, clip_grad_norm, clip_grad_value,
                          loss_scale)


def adalomo(learning_rate: float | Callable[[jax.Array], jax.Array], *,
            weight_decay: float = 0.0, eps: tuple[float, float] = (1e-30, 1e-3),
            clip_threshold: float = 1.0, decay_rate: float = -0.8,
            clip_grad_norm: float | None = None, clip_grad_value: float | None = None,
            loss_scale: float | DynamicLossScale | None = None) -> FusedOptimizer:
    """AdaLomo: Adafactor-style adaptive update fused into the backward pass (module docstring).

    Args:
      learning_rate: float or schedule, scaled per tensor by ``max(eps[1], rms(p))``.
      weight_decay: ``p <- p * (1 - lr_t * weight_decay)`` with the scaled ``lr_t``.
      eps: ``(eps1, eps2)``: added to squared gradients; floor of the parameter scale.
      clip_threshold: the update's RMS bound (grouped update normalisation).
      decay_rate: ``beta_t = 1 - t ** decay_rate``.
      clip_grad_norm, clip_grad_value, loss_scale: as in :func:`lomo`. (``lomo_optim.AdaLomo``
        defaults to a static ``loss_scale=2**10``, which changes nothing in float32 arithmetic
        but an exact power-of-two rescaling; here the default is none.)
    """
    _check_config(clip_grad_norm, clip_grad_value, loss_scale)
    if decay_rate >= 0:
        raise ValueError(f"adalomo: decay_rate must be negative (beta_t = 1 - t**decay_rate), "
                         f"got {decay_rate}")
    return FusedOptimizer("adalomo", learning_rate, weight_decay, clip_grad_norm,
                          clip_grad_value, loss_scale, tuple(eps), clip_threshold, decay_rate)


def _check_config(clip_grad_norm, clip_grad_value, loss_scale) -> None:
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm should be positive, got {clip_grad_norm}")
    if clip_grad_value is not None and not clip_grad_value > 0:
        raise ValueError(f"clip_grad_value should be positive, got {clip_grad_value}")
    if isinstance(loss_scale, DynamicLossScale):
        if not (loss_scale.factor > 1 and loss_scale.window >= 1 and loss_scale.min_scale > 0
                and loss_scale.hysteresis >= 1):
            raise ValueError(f"invalid {loss_scale}: need factor > 1, window >= 1, "
                             f"min_scale > 0, hysteresis >= 1")
    elif loss_scale is not None and not (isinstance(loss_scale, (int, float))
                                         and loss_scale > 0):
        raise ValueError(f"loss_scale must be None, a positive float or DynamicLossScale, got "
                         f"{loss_scale!r}")


def _as_path(p: Any) -> tuple[str, ...]:
    return tuple(p.split("/")) if isinstance(p, str) else tuple(str(k) for k in p)


def _check_float(params: Any) -> None:
    for path, leaf in paths_lib.flatten(params).items():
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"LOMO/AdaLomo train floating-point leaves only; {paths_lib.path_str(path)!r} "
                f"is {dtype if dtype is not None else type(leaf).__name__}. Pass the trainable "
                f"float leaves as the first argument (e.g. jpeft.full_finetune's delta, or "
                f"jpeft.split) and the rest as further arguments of the loss")


def _moment_init(p: jax.Array, stacked: bool) -> Factored | Full:
    """Zero second moments for ``p`` (per slice of the leading axis when ``stacked``)."""
    shape = tuple(p.shape)
    lead, tensor = (shape[:1], shape[1:]) if stacked else ((), shape)
    if stacked and not shape:
        raise ValueError("adalomo: a stacked leaf needs a leading layer axis")
    if len(tensor) >= 2:
        return Factored(jnp.zeros(lead + tensor[:-1], f32),
                        jnp.zeros(lead + tensor[:-2] + tensor[-1:], f32))
    return Full(jnp.zeros(shape, f32))


# --------------------------------------------------------------------------------------------
# The per-tensor update rules


def _preprocess(g: jax.Array, opt: FusedOptimizer, h: Hyper) -> jax.Array:
    """``g`` unscaled, value-clipped and norm-clipped, in float32."""
    g = g.astype(f32) * h.inv_scale
    if opt.clip_grad_value is not None:
        g = jnp.clip(g, -opt.clip_grad_value, opt.clip_grad_value)
    if opt.clip_grad_norm is not None:
        g = g * h.clip_coef
    return g


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _lomo_rule(opt: FusedOptimizer, p: jax.Array, g: jax.Array, state: Any, h: Hyper):
    """SGD with decoupled weight decay on one tensor, as ``(decay, step, state)`` with
    ``p_new = p * decay - step``: ``decay = 1 - lr wd``, ``step = lr g`` (float32)."""
    return 1.0 - h.lr * opt.weight_decay, h.lr * g, state


def _adalomo_rule(opt: FusedOptimizer, p: jax.Array, g: jax.Array, state: Factored | Full,
                  h: Hyper):
    """AdaLomo on one tensor (module docstring), as ``(decay, step, moments)`` with
    ``p_new = p * decay - step``: ``decay = 1 - lr_t wd``, ``step = lr_t u``."""
    eps1, eps2 = opt.eps
    beta = h.beta
    u2 = jnp.square(g) + eps1
    if isinstance(state, Factored):
        row = beta * state.row + (1.0 - beta) * jnp.mean(u2, axis=-1)
        col = beta * state.col + (1.0 - beta) * jnp.mean(u2, axis=-2)
        r_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))[..., :, None]
        u = r_factor * jax.lax.rsqrt(col)[..., None, :] * g
        state = Factored(row, col)
    else:
        v = beta * state.v + (1.0 - beta) * u2
        u = jax.lax.rsqrt(v) * g
        state = Full(v)
    u = u / jnp.maximum(_rms(u) / opt.clip_threshold, 1.0)
    lr = h.lr * jnp.maximum(eps2, _rms(p.astype(f32)))
    return 1.0 - lr * opt.weight_decay, lr * u, state


def _affine_update(opt: FusedOptimizer, p, g, state, h: Hyper):
    """``(decay, step, new_state)`` of one tensor from its raw (scaled) gradient ``g``, such
    that the new tensor is ``p * decay - step`` in float32; ``(1, 0, state)`` when ``h.skip``."""
    rule = _lomo_rule if opt.name == "lomo" else _adalomo_rule
    decay, step, new_state = rule(opt, p, _preprocess(g, opt, h), state, h)
    keep = h.skip > 0
    decay = jnp.where(keep, 1.0, decay)
    step = jnp.where(keep, 0.0, step)
    new_state = jax.tree_util.tree_map(lambda old, new: jnp.where(keep, old, new), state,
                                       new_state)
    return decay, step, new_state


def _tensor_update(opt: FusedOptimizer, p, g, state, h: Hyper):
    """The new ``(p, state)`` of one tensor from its raw (scaled) gradient ``g`` (computed in
    float32, cast back to ``p``'s dtype); unchanged when ``h.skip``."""
    decay, step, new_state = _affine_update(opt, p, g, state, h)
    return (p.astype(f32) * decay - step).astype(p.dtype), new_state


# --------------------------------------------------------------------------------------------
# Sinks: what a complete gradient (of a leaf, or of one layer's slice) is turned into


class _Update:
    """Update pass: a leaf's sink is ``(p, state)``; its cotangent is the updated pair."""

    writes = True

    def __init__(self, opt: FusedOptimizer):
        self.opt = opt
        # LOMO's rule is elementwise: a gradient can be applied to part of a tensor at a time.
        # AdaLomo's moments and update normalisation need the whole tensor's gradient.
        self.elementwise = opt.name == "lomo"

    def apply_piece(self, sink, axis: int, start, g_c, h):
        """``sink`` with the piece of the parameter at ``start`` along ``axis`` (the shape of
        ``g_c``) updated from its gradient ``g_c`` in place (LOMO only)."""
        p, state = sink
        old = jax.lax.dynamic_slice_in_dim(p, start, g_c.shape[axis], axis)
        new, _ = _tensor_update(self.opt, old, g_c, state, h)
        return jax.lax.dynamic_update_slice_in_dim(p, new, start, axis), state

    def apply_rows(self, sink, rows, g_rows, h):
        """``sink`` updated from a gradient that is zero outside the rows ``rows`` ``[n]``
        (distinct; an index past the table is no row), ``g_rows`` ``[n, ...]`` those rows'
        gradient (LOMO only). The other rows get their zero gradient's update, the weight
        decay alone. A float32 table is updated as a layer slice is (:meth:`apply_slice`):
        ``p *= decay; p[rows] -= step`` in place; another dtype has its rows read, updated in
        float32 and written (one rounding, as :func:`_tensor_update`), after ``p`` is decayed
        (rounded once, as the rows no position looked up are)."""
        p, state = sink
        if p.dtype == f32:
            decay, step, _ = _affine_update(self.opt, None, g_rows, state, h)
            if self.opt.weight_decay:
                p = p * decay
            return p.at[rows].add(-step, mode="drop"), state
        old = p.at[rows].get(mode="fill", fill_value=0)
        decay, step, _ = _affine_update(self.opt, old, g_rows, state, h)
        new = (old.astype(f32) * decay - step).astype(p.dtype)
        if self.opt.weight_decay:
            # The decay's in-place write made to come after the read of the old rows (exactly:
            # min(d + isnan(x), d) == d), so XLA keeps no copy of the table for that read.
            decay = _after(jnp.asarray(decay, f32), [old])
            p = (p.astype(f32) * decay).astype(p.dtype)
        return p.at[rows].set(new, mode="drop"), state

    def whole(self, sink, x, g, h, stacked: bool):
        p, state = sink
        if stacked:     # L tensors: the per-slice rule over the leading axis
            return jax.vmap(lambda p_, g_, s_: _tensor_update(self.opt, p_, g_, s_, h))(
                p, g, state)
        return _tensor_update(self.opt, p, g, state, h)

    def read_slice(self, sink, x, l):
        """Layer ``l`` of the parameter, from the buffer being updated."""
        return jax.lax.dynamic_index_in_dim(sink[0], l, keepdims=False)

    def apply_slice(self, sink, l, x_l, g_l, h):
        """``sink`` with slice ``l`` updated from its gradient ``g_l`` (``x_l``: the parameter
        slice, read before). A float32 parameter is updated by in-place scatters,
        ``p[l] *= decay; p[l] -= step`` (XLA reads the slice inside the scatter: no slice-sized
        copy); another dtype by reading, updating in float32 and writing the slice (the
        rounding of ``(p32 * decay - step).astype(dtype)``, as lomo-optim)."""
        p, state = sink
        s_l = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, l, keepdims=False),
                                     state)
        if p.dtype == f32:
            decay, step, new_s = _affine_update(self.opt, x_l, g_l, s_l, h)
            if self.opt.weight_decay:
                p = p.at[l].multiply(decay)
            p = p.at[l].add(-step)
        else:
            old = jax.lax.dynamic_index_in_dim(p, l, keepdims=False)
            new_p, new_s = _tensor_update(self.opt, old, g_l, s_l, h)
            p = jax.lax.dynamic_update_index_in_dim(p, new_p, l, 0)
        state = jax.tree_util.tree_map(
            lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b, l, 0), state, new_s)
        return p, state


class _Norm:
    """Norm pass: a leaf's sink is ``[sum of squared unscaled gradient entries, number of
    non-finite entries]`` (float32)."""

    writes = False
    elementwise = True

    def __init__(self, opt: FusedOptimizer):
        self.opt = opt

    def whole(self, sink, x, g, h, stacked: bool):
        return self.add(sink, g, h)

    def apply_piece(self, sink, axis: int, start, g_c, h):
        return self.add(sink, g_c, h)

    def apply_rows(self, sink, rows, g_rows, h):
        return self.add(sink, g_rows, h)

    def read_slice(self, sink, x, l):
        return jax.lax.dynamic_index_in_dim(x, l, keepdims=False)

    @staticmethod
    def add(sink, g, h):
        g32 = g.astype(f32) * h.inv_scale
        bad = jnp.sum(~jnp.isfinite(g)).astype(f32)
        return sink + jnp.stack([jnp.sum(jnp.square(g32)), bad])


def _tag(mode, stacked: bool):
    """``tag(x, sink, h) = x``; its backward turns the complete gradient ``g`` of ``x`` into the
    sink's cotangent ``mode.whole(sink, x, g)`` (and gives ``x`` none)."""
    @jax.custom_vjp
    def tag(x, sink, h):
        return x

    def fwd(x, sink, h):
        return x, (x, sink, h)

    def bwd(res, g):
        x, sink, h = res
        return None, mode.whole(sink, x, g, h, stacked), None

    tag.defvjp(fwd, bwd)
    return tag


# --------------------------------------------------------------------------------------------
# The program: the loss function's jaxpr and which leaves go which way


#: Primitives that pass one operand through unchanged (when in and out types agree): a leaf seen
#: through them is still the leaf.
_TRANSPARENT = frozenset({"convert_element_type", "copy", "sharding_constraint"})


class _Use(NamedTuple):
    scan: tuple | None      # the path (equation indices through inlined jits) of a scan
    position: int           # the leaf's operand position there
    op: tuple | None = None   # the path of a dot_general (the leaf one operand), a gather
                              # (the leaf the table looked up) or jpeft.lm_cross_entropy's
                              # jit (the leaf the head's kernel)


class Plan(NamedTuple):
    """How a step treats each trainable leaf (paths as in :func:`jpeft.core.paths.flatten`).

    Attributes:
      fused_scan: leaves updated slice by slice inside a layer scan's backward pass (the stacked
        gradient never exists).
      fused_op: leaves whose only use is one operand of a ``dot_general`` (an LM head, a Dense
        kernel outside a scan), the kernel of :func:`jpeft.lm_cross_entropy` or the table of a
        ``gather`` (an embedding): updated in that
        operation's backward pass (a product's after it has read the old weights for the other
        operand's cotangent, so no copy of the weights is kept, and by LOMO in pieces of at
        most ``piece_bytes``; a row lookup's by LOMO as its looked-up rows, otherwise its
        gradient scattered into a buffer created there, not at the start of the step).
      whole: the other used leaves, updated once their whole gradient is complete (at their
        identity).
      stacked: leaves a scan slices along their leading axis (AdaLomo's per-layer tensors).
      unused: leaves the loss does not use: never updated.
    """
    fused_scan: tuple
    fused_op: tuple
    whole: tuple
    stacked: tuple
    unused: tuple


class _Program(NamedTuple):
    closed: Any                 # ClosedJaxpr of the flat loss
    out_tree: Any
    n_train: int
    fused: dict                 # scan path -> {operand position: leaf index}
    ops: dict                   # dot_general / gather path -> (operand position, leaf index)
    inline: frozenset           # jit paths that lead to a fused scan, product or lookup
    stacked: tuple              # per trainable leaf
    used: tuple                 # per trainable leaf
    eligible: tuple             # per trainable leaf


def _trace(loss_fn: Callable, params: Any, args: tuple) -> _Program:
    leaves, in_tree = jax.tree_util.tree_flatten((params, args))
    n_train = len(jax.tree_util.tree_leaves(params))

    def flat(*xs):
        p, a = jax.tree_util.tree_unflatten(in_tree, xs)
        return loss_fn(p, *a)

    avals = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in leaves]
    closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*avals)
    uses: dict[int, list[_Use]] = {k: [] for k in range(n_train)}
    var_leaf = {v: k for k, v in enumerate(closed.jaxpr.invars[:n_train])}
    _analyse(closed.jaxpr, var_leaf, (), uses)
    fused: dict = {}
    ops: dict = {}
    eligible, stacked, used = [], [], []
    for k in range(n_train):
        u = uses[k]
        ok = len(u) == 1 and u[0].scan is not None
        eligible.append(ok)
        stacked.append(any(x.scan is not None for x in u))
        used.append(bool(u))
        if ok:
            fused.setdefault(u[0].scan, {})[u[0].position] = k
        elif len(u) == 1 and u[0].op is not None:
            ops[u[0].op] = (u[0].position, k)
    inline = frozenset(path[:n] for path in (*fused, *ops) for n in range(1, len(path)))
    return _Program(closed, jax.tree_util.tree_structure(out_shape), n_train, fused, ops,
                    inline, tuple(stacked), tuple(used), tuple(eligible))


def _analyse(jaxpr, var_leaf: dict, path: tuple, uses: dict) -> None:
    """Record every use of a trainable leaf in ``jaxpr`` (through same-type pass-through
    primitives and nested ``jit`` s): a scanned operand of a ``scan``, or any other use."""
    for i, eqn in enumerate(jaxpr.eqns):
        here = [(j, var_leaf[v]) for j, v in enumerate(eqn.invars)
                if not isinstance(v, compat.Literal) and v in var_leaf]
        if not here:
            continue
        kind = compat.kind(eqn)
        if (kind in _TRANSPARENT and len(eqn.invars) == 1 and len(eqn.outvars) == 1
                and eqn.invars[0].aval.dtype == eqn.outvars[0].aval.dtype
                and eqn.invars[0].aval.shape == eqn.outvars[0].aval.shape):
            if not isinstance(eqn.outvars[0], compat.DropVar):
                var_leaf[eqn.outvars[0]] = here[0][1]
        elif (kind == "jit" and here == [(1, here[0][1])]
              and lm_loss.chunk_of(compat.jit_parts(eqn).name) is not None):
            # jpeft.lm_cross_entropy with a trainable leaf as the head's kernel (operand 1)
            uses[here[0][1]].append(_Use(None, 1, path + (i,)))
        elif kind == "jit":
            inner = compat.jit_parts(eqn).jaxpr.jaxpr
            sub = {inner.invars[j]: k for j, k in here}
            _analyse(inner, sub, path + (i,), uses)
        elif kind == "scan":
            parts = compat.scan_parts(eqn)
            first_xs = parts.num_consts + parts.num_carry
            for j, k in here:
                uses[k].append(_Use(path + (i,) if j >= first_xs else None, j))
        elif (len(here) == 1 and (kind == "dot_general"
                                  or (kind == "gather" and here[0][0] == 0))):
            j, k = here[0]
            uses[k].append(_Use(None, j, path + (i,)))
        else:
            for _, k in here:
                uses[k].append(_Use(None, -1))
    for v in jaxpr.outvars:
        if not isinstance(v, compat.Literal) and v in var_leaf:
            uses[var_leaf[v]].append(_Use(None, -1))


def plan(loss_fn: Callable, params: Any, *args: Any) -> Plan:
    """Which leaves of ``params`` a LOMO/AdaLomo step updates inside a layer scan, which inside
    their one matrix product or lookup, which at their whole gradient, which are layer-stacked
    and which the loss never uses (and so are never updated). Traces ``loss_fn(params, *args)``
    abstractly; computes nothing."""
    prog = _trace(loss_fn, params, args)
    paths = list(paths_lib.flatten(params))
    pick = lambda flags: tuple(p for p, f in zip(paths, flags) if f)
    fused = {k for _, k in prog.ops.values()}
    in_op = [k in fused for k in range(prog.n_train)]
    whole = [u and not e and not o for u, e, o in zip(prog.used, prog.eligible, in_op)]
    return Plan(pick(prog.eligible), pick(in_op), pick(whole), pick(prog.stacked),
                pick([not u for u in prog.used]))


# --------------------------------------------------------------------------------------------
# Evaluation of the program with identities and fused scans


class _Ctx(NamedTuple):
    prog: _Program
    mode: Any
    sinks: list
    h: Hyper
    pieces: dict            # leaf index -> pieces its gradient is applied in (a product's)


def _read(env: dict, v):
    return v.val if isinstance(v, compat.Literal) else env[v]


def _evaluate(jaxpr, consts: Sequence, args: Sequence, ctx: _Ctx | None, path: tuple) -> list:
    """``jaxpr`` evaluated on ``args``, each equation bound as traced, except the fused scans
    and the ``jit`` s that lead to them (evaluated inline)."""
    env: dict = {}
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        invals = [_read(env, v) for v in eqn.invars]
        here = path + (i,)
        if ctx is not None and here in ctx.prog.fused:
            outs = _fused_scan(eqn, invals, ctx.prog.fused[here], ctx)
        elif ctx is not None and here in ctx.prog.ops:
            fused_op = {"dot_general": _fused_dot, "gather": _fused_gather}.get(
                compat.kind(eqn), _fused_lm_loss)
            outs = fused_op(eqn, invals, *ctx.prog.ops[here], ctx)
        elif ctx is not None and here in ctx.prog.inline:
            inner = compat.jit_parts(eqn).jaxpr
            outs = _evaluate(inner.jaxpr, inner.consts, invals, ctx, here)
        else:
            outs = compat.bind(eqn, invals)
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, compat.DropVar):
                env[v] = x
    return [_read(env, v) for v in jaxpr.outvars]


def _evaluate_some(closed, args: Sequence, wanted: Sequence[int]) -> list:
    """The outputs ``wanted`` (indices) of ``closed`` on ``args``, binding only the equations
    they need (inputs they do not need may be ``None``)."""
    jaxpr = closed.jaxpr
    need = {v for i in wanted for v in [jaxpr.outvars[i]] if not isinstance(v, compat.Literal)}
    keep = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in need for v in eqn.outvars):
            keep.append(eqn)
            need.update(v for v in eqn.invars if not isinstance(v, compat.Literal))
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in reversed(keep):
        outs = compat.bind(eqn, [_read(env, v) for v in eqn.invars])
        for v, x in zip(eqn.outvars, outs):
            if not isinstance(v, compat.DropVar):
                env[v] = x
    return [_read(env, jaxpr.outvars[i]) for i in wanted]


def _is_float(aval) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _depends(jaxpr, inputs: set) -> set:
    """Variables of ``jaxpr`` that depend on one of the input variables ``inputs`` (an equation
    with such an operand: all its outputs)."""
    dep = set(inputs)
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, compat.Literal) and v in dep for v in eqn.invars):
            dep.update(eqn.outvars)
    return dep


def _after(x, values: list):
    """The scalar ``x`` itself, computed so that it depends on one entry of each of the
    floating-point arrays ``values``: ``min(x + isnan(v_1[0]) + ... + isnan(v_n[0]), x) == x``
    (exactly, for every ``x``: finite, infinite or NaN).

    This is how the step orders operations that XLA would otherwise leave unordered (XLA orders
    by data dependence; an ``optimization_barrier`` is removed before buffer assignment on CPU).
    The write of layer ``l``'s new weights into the carried buffer must come after every read of
    those weights in the layer's VJP (``dx = dy W^T`` reads them; the new value itself does not
    depend on ``dx``): a write unordered with a read of the same buffer makes XLA copy the whole
    buffer. With the write index ``_after(l, outputs of the VJP)`` every read comes first and
    the write is in place. Likewise a product's learning rate (:func:`_fused_dot`), zeros to
    scatter into (:func:`_zeros_after`) and the update pass's seed (:func:`_step`)."""
    dep = jnp.zeros((), x.dtype)
    for v in values:
        if v.size:
            first = jax.lax.reshape(v, (v.size,))[0] if v.ndim else v
            dep = dep + jnp.isnan(first).astype(x.dtype)
    return jnp.minimum(x + dep, x)


def _fused_dot(eqn, operands: list, position: int, k: int, ctx: _Ctx) -> list:
    """The ``dot_general`` equation ``eqn`` on ``operands`` whose operand ``position`` is
    trainable leaf ``k`` (its only use), with the leaf's update fused into its backward pass.

    Backward: the dot's VJP gives the other operand's cotangent and the leaf's complete gradient,
    which goes to the leaf's sink (:meth:`_Update.whole`, :meth:`_Norm.whole`) with the learning
    rate made to depend on the other cotangent (exactly: :func:`_after`), so that the write of
    the new weights comes after the VJP's read of the old ones (``dx = dy W^T``). Updated at an
    identity instead (:func:`_tag`), the write is unordered with that read and XLA keeps a copy
    of the weights through the whole step (a vocabulary-sized copy for an LM head)."""
    mode, sink = ctx.mode, ctx.sinks[k]

    @jax.custom_vjp
    def dot(ops, sink, h):
        return compat.bind(eqn, ops)

    def fwd(ops, sink, h):
        return dot(ops, sink, h), (ops, sink, h)

    def bwd(res, cts):
        ops, sink, h = res
        _, vjp = jax.vjp(lambda *o: compat.bind(eqn, list(o)), *ops)
        d_ops = list(vjp(cts))
        g = d_ops[position]
        others = [d for j, d in enumerate(d_ops)
                  if j != position and jnp.issubdtype(d.dtype, jnp.inexact)]
        ordered = h._replace(lr=_after(h.lr, others))
        d_ops[position] = None
        n = ctx.pieces.get(k, 1) if mode.elementwise else 1
        axes = _free_axis(eqn, ops, position)
        if n > 1 and axes is not None:
            new = _apply_in_pieces(eqn, ops, position, axes, cts[0], sink, ordered, mode, n)
        else:
            new = mode.whole(sink, ops[position], g, ordered, False)
        # The rest of the backward pass (which reads the other cotangents) waits for the
        # update, so the leaf's gradient is gone before it goes on (left to itself, XLA may
        # apply an LM head's update at the very end, its gradient alive through every layer's).
        last = jax.tree_util.tree_leaves(new)[0]
        d_ops = [d if d is None or not jnp.issubdtype(d.dtype, jnp.inexact) else
                 _depending(d, last) for d in d_ops]
        return d_ops, new, None

    dot.defvjp(fwd, bwd)
    return dot(list(operands), sink, ctx.h)


def _depending(x, y):
    """``x`` itself, computed so that it depends on ``y`` (exactly: its first entry becomes
    ``min(x0 + isnan(y0), x0) == x0``), for ordering (as :func:`_after`)."""
    if not x.size:
        return x
    flat = jax.lax.reshape(x, (x.size,))
    return jax.lax.reshape(flat.at[0].set(_after(flat[0], [y])), x.shape)


def _fused_lm_loss(eqn, operands: list, position: int, k: int, ctx: _Ctx) -> list:
    """:func:`jpeft.lm_cross_entropy` (the ``jit`` equation ``eqn`` on ``[hidden, kernel,
    labels, weights]``) whose head ``kernel`` is trainable leaf ``k`` (its only use), with the
    head's update fused into the loss's chunked backward pass.

    Backward (:func:`jpeft.lm_loss.backward`): each chunk's logits are recomputed from the
    kernel's columns, read from the buffer being updated; under an elementwise rule (LOMO, the
    norm pass) the chunk's gradient is applied to those columns right away, after the hidden
    states' cotangent has read them (:func:`_after`), so neither the logits' cotangent nor the
    head's gradient exists whole; AdaLomo's rule gets the gradient whole, gathered chunk by
    chunk. Chunks: the loss's own width, narrowed to the product's piece size
    (``make_step``'s ``piece_bytes``). The rest of the backward pass waits for the update."""
    del position
    mode, sink = ctx.mode, ctx.sinks[k]
    v = operands[1].shape[1]
    width = lm_loss.chunk_of(compat.jit_parts(eqn).name)
    width = min(width, -(-v // ctx.pieces.get(k, 1)))

    @jax.custom_vjp
    def loss(h, kernel, labels, w, sink, hyp):
        return compat.bind(eqn, [h, kernel, labels, w])

    def fwd(h, kernel, labels, w, sink, hyp):
        lse, picked = lm_loss.forward(h, kernel, labels, width)
        return [lm_loss.mean_loss(lse, picked, w)], (h, kernel, labels, w, lse, sink, hyp)

    def bwd(res, cts):
        h, kernel, labels, w, lse, sink, hyp = res
        g = cts[0]
        column = lambda a, start, length: jax.lax.dynamic_slice_in_dim(a, start, length, 1)
        if mode.elementwise:
            read = ((lambda acc, start, length: column(acc[0], start, length)) if mode.writes
                    else (lambda acc, start, length: column(kernel, start, length)))
            apply = lambda acc, start, g_c, dh: mode.apply_piece(
                acc, 1, start, g_c, hyp._replace(lr=_after(hyp.lr, [dh])))
            dh, new = lm_loss.backward(h, read, labels, w, lse, g, width, v, apply, sink)
        else:
            put = lambda acc, start, g_c, dh: jax.lax.dynamic_update_slice_in_dim(acc, g_c,
                                                                                  start, 1)
            dh, grad = lm_loss.backward(h, lambda _, start, length: column(kernel, start, length),
                                        labels, w, lse, g, width, v, put,
                                        _zeros_after(kernel.shape, lse).astype(kernel.dtype))
            new = mode.whole(sink, kernel, grad, hyp._replace(lr=_after(hyp.lr, [dh])), False)
        dh = _depending(dh, jax.tree_util.tree_leaves(new)[0]).astype(h.dtype)
        return dh, None, None, None, new, None

    loss.defvjp(fwd, bwd)
    return loss(*operands, sink, ctx.h)


def _free_axis(eqn, ops: list, position: int) -> tuple[int, int] | None:
    """``(axis, out_axis)``: the largest axis of operand ``position`` of the ``dot_general``
    ``eqn`` that is neither contracted nor a batch axis, and the axis of the product it becomes
    (the product's axes: batch, then the left operand's free axes, then the right's); ``None``
    when the operand has no such axis."""
    (lc, rc), (lb, rb) = compat.dot_dims(eqn.params)
    free = [[a for a in range(ops[j].ndim) if a not in (lc, rc)[j] and a not in (lb, rb)[j]]
            for j in (0, 1)]
    if not free[position]:
        return None
    axis = max(free[position], key=lambda a: ops[position].shape[a])
    return axis, len(lb) + (free[0].index(axis) if position == 0
                            else len(free[0]) + free[1].index(axis))


def _apply_in_pieces(eqn, ops: list, position: int, axes: tuple[int, int], ct, sink, h, mode,
                     n: int):
    """``sink`` after the gradient of operand ``position`` of the ``dot_general`` ``eqn`` is
    applied to it in ``n`` pieces along the operand's free ``axis`` (``axes``: that axis and the
    product's axis it becomes), one piece computed and applied at a time.

    The product is linear in the operand ``W``, so the gradient of a piece ``W[..., c, ...]``
    is the transpose of the product restricted to it applied to the cotangent's matching piece
    ``ct[..., c, ...]`` (for an LM head ``[hidden, vocab]``: ``x^T ct[:, c]``): exact, with
    ``n`` products of ``1/n`` the size instead of one. The pieces are a loop (``fori_loop``)
    whose carry is the sink, so XLA holds one piece's gradient at a time and updates the
    parameter in place; the last piece is narrower when ``n`` does not divide the axis."""
    axis, out_axis = axes
    w = ops[position]
    size = w.shape[axis]

    def gradient(start, length):
        shape = list(w.shape)
        shape[axis] = length

        def product(piece):
            operands = list(ops)
            operands[position] = piece
            return compat.bind(eqn, operands)[0]

        ct_piece = jax.lax.dynamic_slice_in_dim(ct, start, length, out_axis)
        (g,) = jax.linear_transpose(product, jax.ShapeDtypeStruct(tuple(shape), w.dtype))(
            ct_piece)
        return g

    return lm_loss.over_chunks(
        size, -(-size // min(n, size)),
        lambda start, length, sink: mode.apply_piece(sink, axis, start,
                                                     gradient(start, length), h), sink)


def _fused_gather(eqn, operands: list, position: int, k: int, ctx: _Ctx) -> list:
    """The ``gather`` equation ``eqn`` (a lookup in trainable leaf ``k``, operand 0: an
    embedding table) with the leaf's update fused into its backward pass.

    Backward, for a row lookup (``table[ids]``, ``jnp.take(table, ids, axis=0)``: whole rows
    of a table ``[V, ...]`` at indices ``ids``) under an elementwise rule (LOMO, the norm pass):
    the gradient is zero outside the looked-up rows, so it is kept as those rows only
    (:func:`_row_gradient`: ``[n, ...]`` for ``n`` looked-up positions, duplicates summed) and
    applied to them (:meth:`_Update.apply_rows`), with no table-sized gradient at all.
    Otherwise (AdaLomo, another gather): the table's gradient is the cotangent scatter-added
    into zeros, as JAX's own transpose of ``gather`` computes it, but the zeros are made to
    depend on the cotangent (exactly: ``min(isnan(ct[0]), 0) == 0``). JAX's zeros are a
    constant that XLA materialises at the start of the step, a table-sized buffer alive
    through the forward and backward passes next to every other layer's gradient; these are
    created when the gradient is."""
    del position
    mode, sink = ctx.mode, ctx.sinks[k]
    params = eqn.params
    dn = params["dimension_numbers"]
    scatter_dn = jax.lax.ScatterDimensionNumbers(
        update_window_dims=dn.offset_dims, inserted_window_dims=dn.collapsed_slice_dims,
        scatter_dims_to_operand_dims=dn.start_index_map,
        operand_batching_dims=dn.operand_batching_dims,
        scatter_indices_batching_dims=dn.start_indices_batching_dims)
    rows = mode.elementwise and _is_row_lookup(params, *operands)

    @jax.custom_vjp
    def gather(table, indices, sink, h):
        return compat.bind(eqn, [table, indices])

    def fwd(table, indices, sink, h):
        return gather(table, indices, sink, h), (table, indices, sink, h)

    def bwd(res, ct):
        table, indices, sink, h = res
        ct = ct[0] if isinstance(ct, (list, tuple)) else ct
        if rows:
            ids, g_rows = _row_gradient(params, table, indices, ct)
            return None, None, mode.apply_rows(sink, ids, g_rows, h), None
        g = jax.lax.scatter_add(_zeros_after(table.shape, ct), indices, ct, scatter_dn,
                                indices_are_sorted=params["indices_are_sorted"],
                                unique_indices=params["unique_indices"], mode=params["mode"])
        return None, None, mode.whole(sink, table, g, h, False), None

    gather.defvjp(fwd, bwd)
    out = gather(operands[0], operands[1], sink, ctx.h)
    return out if isinstance(out, (list, tuple)) else [out]


def _zeros_after(shape: tuple, ct):
    """Zeros of ``shape`` (``ct``'s dtype) to scatter-add ``ct`` into, made to depend on ``ct``
    (exactly: ``min(isnan(ct[0]), 0) == 0``): XLA creates them when the sum is formed, where
    ``jnp.zeros`` is a constant it creates at the start of the step and keeps through it."""
    return jnp.broadcast_to(_after(jnp.zeros((), ct.dtype), [ct]), shape)


def _is_row_lookup(params, table, indices) -> bool:
    """Whether a ``gather`` takes whole rows of ``table`` (``[V, ...]``) at the indices
    ``indices`` ``[..., 1]`` (the last axis the index vector): ``table[ids]``."""
    dn = params["dimension_numbers"]
    return (tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map) == (0,)
            and not tuple(dn.operand_batching_dims) and table.ndim >= 1
            and indices.ndim >= 1 and indices.shape[-1] == 1
            and tuple(params["slice_sizes"]) == (1, *table.shape[1:])
            and len(dn.offset_dims) == table.ndim - 1)


def _row_gradient(params, table, indices, ct):
    """``(ids, g_rows)``: the gradient of a row lookup (:func:`_is_row_lookup`) with respect to
    ``table`` ``[V, ...]``, as the distinct looked-up rows ``ids`` ``[n]`` (padded with ``V``,
    no row) and their gradients ``g_rows`` ``[n, ...]`` (the cotangents of every position
    that looked the row up, summed), ``n`` the number of looked-up positions. The full
    gradient is ``zeros.at[ids].add(g_rows)``. Indices out of bounds are clamped under the
    gather's ``clip`` mode and dropped (give no gradient) otherwise, as JAX's transpose."""
    v = table.shape[0]
    offset = tuple(params["dimension_numbers"].offset_dims)
    batch = [a for a in range(ct.ndim) if a not in offset]
    n = int(np.prod([ct.shape[a] for a in batch], dtype=np.int64))
    ct_rows = jnp.transpose(ct, batch + list(offset)).reshape((n, *table.shape[1:]))
    ids = indices.reshape(n).astype(jnp.int32)
    if params["mode"] == jax.lax.GatherScatterMode.CLIP:
        ids = jnp.clip(ids, 0, v - 1)
    else:
        ids = jnp.where((ids < 0) | (ids >= v), v, ids)
    uniq, inverse = jnp.unique(ids, size=n, fill_value=v, return_inverse=True)
    g_rows = _zeros_after(ct_rows.shape, ct).at[inverse.reshape(n)].add(ct_rows)
    keep = (uniq < v).reshape((n,) + (1,) * (g_rows.ndim - 1))
    return uniq, jnp.where(keep, g_rows, jnp.zeros((), g_rows.dtype))


def _fused_scan(eqn, operands: list, train: dict, ctx: _Ctx) -> list:
    """The ``scan`` equation ``eqn`` on ``operands`` with the update of its trainable scanned
    operands (``train``: operand position -> leaf index) fused into its backward pass.

    A ``jax.custom_vjp`` function of the operands, the trainable leaves' sinks and the hyper
    scalars, computing the scan's outputs.

    Forward: the scan, the body's VJP taken at every iteration (``jax.vjp``; its function is a
    pytree whose leaves are the residuals). Of the residuals, those that are a loop constant or a
    scanned operand are not stored (read in the backward pass), nor those that depend on loop
    constants only (computed once, outside the loop), nor those computed from the trainable
    slices and loop constants alone (a weight slice's cast or transpose: recomputed from the
    slice in the backward pass); the rest (activations) are stacked, one per iteration, as JAX's
    own differentiation of the scan stores them.

    Backward: a scan in the opposite direction whose carry holds the carry's cotangent, the
    accumulated cotangents of the loop constants and the trainable leaves' sinks (in the update
    pass: the stacked parameters and optimizer state, updated in place). At layer ``l`` it reads
    the weight slices from the sinks (not yet updated), rebuilds and applies the body's VJP, and
    gives each weight slice's gradient to its sink: :meth:`_Update.apply_slice` (slice ``l``
    of the parameter and state updated in place) or :meth:`_Norm.add`. Only one layer's gradient exists at a time.
    Cotangents are returned for the operands JAX perturbs (``symbolic_zeros``): the others get
    none and cost nothing.
    """
    parts = compat.scan_parts(eqn)
    body = parts.jaxpr
    nc, nk, length = parts.num_consts, parts.num_carry, parts.length
    n_ops = len(operands)
    in_avals, out_avals = body.in_avals, body.out_avals
    n_out = len(out_avals)
    train_pos = sorted(train)
    sinks = tuple(ctx.sinks[train[j]] for j in train_pos)
    mode = ctx.mode
    static: dict = {}
    for i in range(nc, nc + nk):
        if _is_float(in_avals[i]) != _is_float(out_avals[i - nc]):
            raise ValueError(f"LOMO fused scan: carry {i - nc} changes between a float and a "
                             f"non-float type ({in_avals[i]} -> {out_avals[i - nc]})")

    def run(ops, sinks, h):
        return tuple(compat.bind(eqn, list(ops)))

    def fwd(ops, sinks, h):
        vals = [o.value for o in ops]
        pert = [o.perturbed for o in ops]
        sinks = jax.tree_util.tree_map(lambda s: s.value, sinks)
        h = jax.tree_util.tree_map(lambda s: s.value, h)
        # The body's differentiated inputs: perturbed float constants and scanned operands,
        # every float carry (its cotangent flows around the loop), the trainable slices.
        diff = [i for i in range(n_ops) if i in train or (
            _is_float(in_avals[i]) and (pert[i] or nc <= i < nc + nk))]
        fouts = [o for o in range(n_out) if _is_float(out_avals[o])]
        iouts = [o for o in range(n_out) if not _is_float(out_avals[o])]
        holder = {}

        def res_fn(*a):
            def f(*dv):
                full = list(a)
                for i, x in zip(diff, dv):
                    full[i] = x
                outs = jcore.jaxpr_as_fun(body)(*full)
                return [outs[o] for o in fouts], [outs[o] for o in iouts]
            fo, vjp_fn, io = jax.vjp(f, *[a[i] for i in diff], has_aux=True)
            leaves, holder["tdef"] = jax.tree_util.tree_flatten(vjp_fn)
            return fo, io, leaves

        res_closed = jax.make_jaxpr(res_fn)(
            *[jax.ShapeDtypeStruct(av.shape, av.dtype) for av in in_avals])
        rj = res_closed.jaxpr
        n_prim = n_out
        loop_vars = _depends(rj, {v for i, v in enumerate(rj.invars)
                                  if nc <= i and i not in train})
        train_vars = _depends(rj, {rj.invars[j] for j in train_pos})
        invar_pos = {v: i for i, v in enumerate(rj.invars)}
        constvars = set(rj.constvars)
        kinds = []  # per residual: (kind, operand position or literal value)
        for v in rj.outvars[n_prim:]:
            if isinstance(v, compat.Literal):
                kinds.append(("lit", v.val))
            elif v in invar_pos and invar_pos[v] < nc:
                kinds.append(("const", invar_pos[v]))
            elif v in invar_pos and invar_pos[v] >= nc + nk:
                kinds.append(("xs", invar_pos[v]))
            elif v in constvars or (v not in loop_vars and v not in train_vars):
                kinds.append(("hoist", None))
            elif v not in loop_vars:
                kinds.append(("recompute", None))
            else:
                kinds.append(("stack", None))
        at = lambda kind: [n_prim + r for r, kd in enumerate(kinds) if kd[0] == kind]
        stack_idx, hoist_idx = at("stack"), at("hoist")
        consts = vals[:nc]

        def body_fwd(carry, xs):
            outs = jcore.jaxpr_as_fun(res_closed)(*consts, *carry, *xs)
            by_out = dict(zip(fouts + iouts, outs[:n_prim]))
            return ([by_out[o] for o in range(nk)],
                    ([by_out[o] for o in range(nk, n_out)], [outs[r] for r in stack_idx]))

        carry, (ys, stacked_res) = jax.lax.scan(
            body_fwd, vals[nc:nc + nk], vals[nc + nk:], length=length, reverse=parts.reverse,
            unroll=parts.unroll)
        hoisted = (_evaluate_some(res_closed, consts + [None] * (n_ops - nc), hoist_idx)
                   if hoist_idx else [])
        # Operands the backward pass reads: the constants and the scanned operands (sliced
        # again; the trainable ones in the norm pass only: in the update pass they are read from
        # their sinks, the buffers being updated, which must have no other reader).
        keep = [None if nc <= i < nc + nk or (i in train and mode.writes) else v
                for i, v in enumerate(vals)]
        static.update(diff=diff, fouts=fouts, pert=pert, kinds=kinds, tdef=holder["tdef"],
                      res_closed=res_closed, recompute_idx=at("recompute"))
        return tuple(carry) + tuple(ys), (stacked_res, hoisted, keep, sinks, h)

    def bwd(res, cts):
        stacked_res, hoisted, vals, sinks, h = res
        diff, fouts, pert, kinds = static["diff"], static["fouts"], static["pert"], static["kinds"]
        tdef, res_closed, recompute_idx = (static["tdef"], static["res_closed"],
                                           static["recompute_idx"])
        consts = vals[:nc]
        diff_consts = [i for i in diff if i < nc]
        diff_carry = [i for i in diff if nc <= i < nc + nk]
        diff_xs = [i for i in diff if i >= nc + nk and i not in train]
        zeros = lambda av: jnp.zeros(av.shape, av.dtype)
        given = lambda ct: not isinstance(ct, SymbolicZero)
        ys_keys = [o for o in fouts if o >= nk and given(cts[o])]
        ct_carry0 = [cts[i - nc] if given(cts[i - nc]) else zeros(in_avals[i])
                     for i in diff_carry]
        acc0 = [zeros(in_avals[i]) for i in diff_consts]

        def body_bwd(carry, xs):
            ct_carry, acc, sinks_c = carry
            l, stacked_l, ct_ys_l = xs
            sink_of = dict(zip(train_pos, sinks_c))
            # Inputs of the body at layer l (None for the carries, which no residual reads).
            slices = [None] * (n_ops - nc)
            for i in range(nc + nk, n_ops):
                slices[i - nc] = (mode.read_slice(sink_of[i], vals[i], l) if i in train else
                                  jax.lax.dynamic_index_in_dim(vals[i], l, keepdims=False))
            again = iter(_evaluate_some(res_closed, consts + slices, recompute_idx)
                         if recompute_idx else [])
            stacked, hz = iter(stacked_l), iter(hoisted)
            leaves = []
            for kd, arg in kinds:
                leaves.append(arg if kd == "lit" else consts[arg] if kd == "const" else
                              slices[arg - nc] if kd == "xs" else next(hz) if kd == "hoist"
                              else next(again) if kd == "recompute" else next(stacked))
            vjp_fn = jax.tree_util.tree_unflatten(tdef, leaves)
            ct_ys = dict(zip(ys_keys, ct_ys_l))
            ct_out = [ct_carry[diff_carry.index(o + nc)] if o < nk else
                      ct_ys[o] if o in ct_ys else zeros(out_avals[o]) for o in fouts]
            ct_in = dict(zip(diff, vjp_fn(ct_out)))
            if mode.writes:
                # Read again for the update at the write's index (ordered after the VJP,
                # :func:`_after`): XLA fuses read, update and write into one in-place operation
                # on the carried buffer.
                lw = _after(l, list(ct_in.values()))
                sinks_c = tuple(mode.apply_slice(sk, lw, slices[j - nc], ct_in[j], h)
                                for sk, j in zip(sinks_c, train_pos))
            else:
                sinks_c = tuple(mode.add(sk, ct_in[j], h) for sk, j in zip(sinks_c, train_pos))
            acc = [a + ct_in[i] for a, i in zip(acc, diff_consts)]
            return ([ct_in[i] for i in diff_carry], acc, sinks_c), [ct_in[i] for i in diff_xs]

        xs = (jnp.arange(length), stacked_res, [cts[o] for o in ys_keys])
        (ct_carry, acc, sinks_out), ct_xs = jax.lax.scan(
            body_bwd, (ct_carry0, acc0, tuple(sinks)), xs, length=length,
            reverse=not parts.reverse, unroll=parts.unroll)
        ct_ops = [None] * n_ops
        for i, c in [*zip(diff_consts, acc), *zip(diff_carry, ct_carry), *zip(diff_xs, ct_xs)]:
            ct_ops[i] = c if pert[i] else None
        return tuple(ct_ops), tuple(sinks_out), None

    fused = jax.custom_vjp(run)
    fused.defvjp(fwd, bwd, symbolic_zeros=True)
    return list(fused(tuple(operands), sinks, ctx.h))


# --------------------------------------------------------------------------------------------
# The train step


class FusedStep:
    """A compiled LOMO/AdaLomo train step: ``step(params, state, *args) -> (params, state,
    metrics)`` (:func:`make_step`). ``init(params, *args)`` builds the optimizer state for the
    program (AdaLomo's per-layer moments for layer-stacked leaves); ``plan(params, *args)``
    says how each leaf is updated (:func:`plan`); ``lower(...)`` lowers the jitted step (for
    ``memory_analysis()``)."""

    def __init__(self, loss_fn, opt: FusedOptimizer, jitted, has_aux: bool):
        self.loss_fn = loss_fn
        self.opt = opt
        self.jitted = jitted
        self.has_aux = has_aux

    def _loss(self, params, *args):
        out = self.loss_fn(params, *args)
        return out[0] if self.has_aux else out

    def init(self, params: Any, *args: Any):
        return self.opt.init(params, stacked=plan(self._loss, params, *args).stacked)

    def plan(self, params: Any, *args: Any) -> Plan:
        return plan(self._loss, params, *args)

    def lower(self, *args):
        return self.jitted.lower(*args)

    def __call__(self, params, state, *args):
        return self.jitted(params, state, *args)


def make_step(loss_fn: Callable[..., Any], opt: FusedOptimizer, *, donate: bool = True,
              has_aux: bool = False, piece_bytes: int | None = None,
              compiler_options: dict | None = None) -> FusedStep:
    """The jit-compiled LOMO/AdaLomo step for ``loss_fn``.

    Args:
      loss_fn: ``(params, *args) -> loss`` (a float scalar), or ``-> (loss, aux)`` with
        ``has_aux``. ``params`` is the tree trained (every leaf floating-point); ``args`` the
        rest (frozen weights, the batch), traced as arguments.
      opt: :func:`lomo` or :func:`adalomo`.
      donate: donate ``params`` and ``state`` (updated in place; use the returned ones). Without
        donation the step holds the old and the new parameters.
      piece_bytes: LOMO applies the gradient of a leaf updated in its matrix product (an LM
        head, a kernel outside a layer scan) in pieces of at most this many bytes along the
        leaf's largest free axis, one computed and applied at a time (exact: LOMO's rule is
        elementwise); ``None``: an eighth of the largest gradient the step holds at once
        otherwise (one layer of a layer scan, or a whole leaf), so that no product's gradient
        rivals a layer's. AdaLomo applies whole gradients (its moments and update normalisation
        need the whole tensor); its first (norm) pass is pieced as LOMO's.
      compiler_options: XLA options; ``None``: those of :func:`jpeft.make_train_step`
        (:func:`jpeft.core.xla_options.train_step_options`).

    Returns:
      :class:`FusedStep`; ``metrics``: ``"loss"`` (unscaled), ``"grad_norm"`` (when a norm pass
      runs), ``"overflow"`` (the step was skipped), ``"loss_scale"`` (dynamic scaling) and
      ``"aux"`` with ``has_aux``.
    """
    options = (xla_options.train_step_options() if compiler_options is None
               else dict(compiler_options))

    if piece_bytes is not None and not piece_bytes > 0:
        raise ValueError(f"make_step: piece_bytes should be a positive number of bytes or None, "
                         f"got {piece_bytes!r}")

    def step(params, state, *args):
        return _step(loss_fn, opt, has_aux, piece_bytes, params, state, args)

    jitted = jax.jit(step, donate_argnums=(0, 1) if donate else (),
                     compiler_options=options or None)
    return FusedStep(loss_fn, opt, jitted, has_aux)


def _learning_rate(opt: FusedOptimizer, count):
    lr = opt.learning_rate
    return jnp.asarray(lr(count) if callable(lr) else lr, f32)


def _step(loss_fn, opt: FusedOptimizer, has_aux: bool, piece_bytes, params, state, args):
    _check_float(params)
    prog = _trace(loss_fn, params, args)
    xs, p_tree = jax.tree_util.tree_flatten(params)
    pieces = _pieces(prog, xs, piece_bytes)
    arg_leaves = jax.tree_util.tree_leaves(args)
    paths = list(paths_lib.flatten(params))
    n = len(xs)
    if opt.name == "adalomo":
        moments = p_tree.flatten_up_to(state.moments)
        for k in range(n):
            want = _moment_init(jax.ShapeDtypeStruct(xs[k].shape, xs[k].dtype), prog.stacked[k])
            got = jax.tree_util.tree_map(jnp.shape, moments[k])
            if (type(got) is not type(want)
                    or got != jax.tree_util.tree_map(jnp.shape, want)):
                raise ValueError(
                    f"adalomo: the moments of {paths_lib.path_str(paths[k])!r} do not fit the "
                    f"program (a layer scan {'slices' if prog.stacked[k] else 'does not slice'} "
                    f"its leading axis); build the state with step.init(params, *args)")
    else:
        moments = [() for _ in range(n)]

    count = state.count
    lr = _learning_rate(opt, count)
    t = (count + 1).astype(f32)
    beta = 1.0 - t ** opt.decay_rate
    ls = state.loss_scale
    if opt.dynamic:
        scale = ls.scale
    elif opt.loss_scale is not None:
        scale = jnp.asarray(opt.loss_scale, f32)
    else:
        scale = jnp.ones((), f32)
    inv_scale = 1.0 / scale
    one, zero = jnp.ones((), f32), jnp.zeros((), f32)

    def objective(mode, sinks, h, seed):
        outs = _loss_with_sinks_flat(prog, mode, xs, arg_leaves, sinks, h, pieces)
        out = jax.tree_util.tree_unflatten(prog.out_tree, outs)
        loss, aux = out if has_aux else (out, None)
        return loss.astype(f32) * seed, (loss, aux)

    metrics = {}
    skip = zero
    clip_coef = one
    if opt.needs_norm_pass:
        h0 = Hyper(lr, inv_scale, one, zero, beta)
        norm_sinks = [jnp.zeros((2,), f32) for _ in range(n)]
        sums = jax.grad(lambda s: objective(_Norm(opt), s, h0, scale)[0])(norm_sinks)
        total = sum((s for s, u in zip(sums, prog.used) if u), jnp.zeros((2,), f32))
        norm = jnp.sqrt(total[0])
        overflow = (total[1] > 0) | ~jnp.isfinite(norm)
        metrics["grad_norm"] = norm
        if opt.clip_grad_norm is not None:
            clip_coef = jnp.minimum(opt.clip_grad_norm / (norm + 1e-6), 1.0)
        skip = overflow.astype(f32)
        metrics["overflow"] = overflow
    h = Hyper(lr, inv_scale, clip_coef, skip, beta)
    seed = scale
    if opt.needs_norm_pass:
        # The update pass's backward starts from the loss scale made to depend (exactly, on its
        # value: min(s + isnan(total), s) == s) on the first pass's result: XLA then cannot
        # merge the two backward passes into one, which would keep every gradient of the first
        # pass alive until the clip coefficient is known (the whole gradient tree). The forward
        # passes stay identical and XLA may compute the forward once, as lomo-optim's
        # ``retain_graph`` does.
        seed = _after(scale, [total[0]])
    sinks = [(x, m) for x, m in zip(xs, moments)]
    (_, (loss, aux)), new_sinks = jax.value_and_grad(
        lambda s: objective(_Update(opt), s, h, seed), has_aux=True)(sinks)
    new_x = [ns[0] if u else x for ns, x, u in zip(new_sinks, xs, prog.used)]
    new_params = jax.tree_util.tree_unflatten(p_tree, new_x)
    applied = skip == 0
    new_count = count + applied.astype(count.dtype)
    new_ls = ls
    if opt.dynamic:
        new_ls = _update_loss_scale(opt.loss_scale, ls, skip > 0)
        metrics["loss_scale"] = ls.scale
    metrics["loss"] = loss
    if has_aux:
        metrics["aux"] = aux
    if opt.name == "adalomo":
        new_m = [ns[1] if u else m for ns, m, u in zip(new_sinks, moments, prog.used)]
        new_state = AdaLomoState(new_count, new_ls, jax.tree_util.tree_unflatten(p_tree, new_m))
    else:
        new_state = LomoState(new_count, new_ls)
    return new_params, new_state, metrics


def _pieces(prog: _Program, xs: list, piece_bytes: int | None) -> dict:
    """Leaf index -> the number of pieces the gradient of a leaf updated in its matrix product
    is applied in: ``ceil(bytes / piece_bytes)`` (1 leaves it whole). ``piece_bytes=None``: an
    eighth of the largest gradient held at once on the other paths (the slices of one layer
    of a fused scan together; a whole leaf)."""
    in_op = {k for _, k in prog.ops.values()}
    if piece_bytes is None:
        units = [sum(xs[k].nbytes // max(xs[k].shape[0], 1) for k in train.values())
                 for train in prog.fused.values()]
        units += [xs[k].nbytes for k in range(prog.n_train) if prog.used[k]
                  and not prog.eligible[k]]
        piece_bytes = max(units, default=0) / 8
    if not piece_bytes:
        return {}
    return {k: -(-xs[k].nbytes // int(max(piece_bytes, 1))) for k in in_op}


def _loss_with_sinks_flat(prog: _Program, mode, xs, arg_leaves, sinks, h, pieces) -> list:
    """The flat outputs of the loss program with every used trainable leaf routed to its sink:
    through an identity (:func:`_tag`) unless a fused scan, product or lookup consumes it. ``xs``
    enter with their gradient stopped: the only derivative taken is the sinks' (the rules)."""
    ctx = _Ctx(prog, mode, sinks, h, pieces)
    in_op = {k for _, k in prog.ops.values()}
    inputs = []
    for k, x in enumerate(xs):
        x = jax.lax.stop_gradient(x)
        if prog.used[k] and not prog.eligible[k] and k not in in_op:
            x = _tag(mode, prog.stacked[k])(x, sinks[k], h)
        inputs.append(x)
    return _evaluate(prog.closed.jaxpr, prog.closed.consts, inputs + list(arg_leaves), ctx, ())


def _update_loss_scale(cfg: DynamicLossScale, ls: LossScaleState, overflow) -> LossScaleState:
    """``lomo_optim.DynamicLossScaler.update_scale`` (its ``consecutive_hysteresis=False``)."""
    at_last = (ls.hysteresis <= 1)
    shrunk = jnp.maximum(ls.scale / cfg.factor, cfg.min_scale)
    scale_o = jnp.where(at_last, shrunk, ls.scale)
    hyst_o = jnp.where(at_last, ls.hysteresis, ls.hysteresis - 1)
    grow = (ls.since_overflow % cfg.window) == 0
    scale_c = jnp.where(grow, ls.scale * cfg.factor, ls.scale)
    hyst_c = jnp.where(grow, jnp.asarray(cfg.hysteresis, jnp.int32), ls.hysteresis)
    return LossScaleState(jnp.where(overflow, scale_o, scale_c).astype(f32),
                          jnp.where(overflow, 1, ls.since_overflow + 1).astype(jnp.int32),
                          jnp.where(overflow, hyst_o, hyst_c).astype(jnp.int32))


__all__ = [
    "AdaLomoState", "DynamicLossScale", "Factored", "Full", "FusedOptimizer", "FusedStep",
    "Hyper", "LomoState", "LossScaleState", "Plan", "adalomo", "lomo", "make_step", "plan",
]
