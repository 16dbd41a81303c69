"""Training with respect to the delta only.

``loss(delta) = task_loss(f(params, delta, batch))``: gradients are taken with respect to the delta
alone (``argnums`` of the delta), so no gradient is ever formed for a frozen weight, and the
optimizer's state exists only for the delta. The step is a pure function,
``(params, delta, opt_state, batch, key) -> (delta, opt_state, metrics)``, jit-compiled with the
delta's and the optimizer state's buffers donated.

A step whose loss or gradients are not all finite is skipped: the delta and the optimizer state
come out exactly as they went in (``jax.lax.cond``, so nothing is computed from the bad
gradients), ``metrics["skipped"]`` is true, and :class:`TrainStep` counts skips in a row and in
total, raising :class:`NonFiniteError` (carrying the last good delta and optimizer state) after
``max_skips_in_row`` in a row.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jpeft.core import method as method_lib
from jpeft.core import xla_options

LossFn = Callable[[Any, Any, Any, jax.Array], Any]


def partition(transforms: Mapping[str, optax.GradientTransformation],
              method: method_lib.Method) -> optax.GradientTransformation:
    """``optax.partition`` over a delta, labelled by ``method.labels`` (part names for ``compose``).

    ``jpeft.partition({"lora": optax.adamw(1e-3), "head": optax.adam(1e-2)}, method)``.
    """
    return optax.partition(dict(transforms), method.labels)


def _split_aux(out):
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        return out[0], dict(out[1])
    return out, {}


def method_optimizer(method: method_lib.Method | None,
                     optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optimizer`` wrapped with the method's own optimizer-side state (``method.optimizer``,
    e.g. AdaLoRA's rank allocator); unchanged for methods without one or ``method=None``."""
    if method is None or method.optimizer is None:
        return optimizer
    return method.optimizer(optimizer)


class NonFiniteError(FloatingPointError):
    """Too many train steps in a row had a non-finite loss or gradient. ``delta`` and
    ``opt_state`` are the last good ones (every skipped step left them unchanged); ``metrics`` the
    last step's."""

    def __init__(self, message: str, delta: Any, opt_state: Any, metrics: Mapping[str, Any]):
        super().__init__(message)
        self.delta, self.opt_state, self.metrics = delta, opt_state, metrics


def all_finite(loss: Any, grads: Any) -> jax.Array:
    """Whether ``loss`` and every entry of ``grads`` are finite (a scalar bool)."""
    ok = jnp.all(jnp.isfinite(loss))
    for g in jax.tree_util.tree_leaves(grads):
        if jnp.issubdtype(g.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(g))
    return ok


class TrainStep:
    """The compiled step with host-side counts of skipped steps.

    ``step(params, delta, opt_state, batch, key) -> (delta, opt_state, metrics)``; with skipping on,
    ``metrics`` also holds ``"skipped_in_row"`` and ``"skipped_total"`` (ints), and the call raises
    :class:`NonFiniteError` once ``max_skips_in_row`` steps in a row were skipped. Reading the
    skip flag waits for the step to finish (as reading the loss does). Called inside a traced
    function (a ``jax.lax.scan`` of steps), it runs ``step.nested`` (the same step without its
    compile options, which only a top-level ``jax.jit`` takes) and returns the per-step
    ``"skipped"`` flags only. ``step.jitted`` is the top-level ``jax.jit`` function
    (``step.lower(...)`` lowers it).

    With ``donate`` (``make_train_step``'s default) the ``delta`` and ``opt_state`` passed in are
    donated: their buffers are reused for the outputs and deleted, so keep only the returned
    ones (``delta, opt_state, metrics = step(params, delta, opt_state, batch, key)``). A call
    given an already donated delta or state raises :class:`DonatedBufferError` naming the
    argument and its leaf.
    """

    def __init__(self, jitted: Callable, skip_nonfinite: bool, max_skips_in_row: int | None,
                 nested: Callable | None = None, donate: bool = False):
        self.donate = donate
        self.jitted = jitted
        self.nested = jitted if nested is None else nested
        self.skip_nonfinite = skip_nonfinite
        self.max_skips_in_row = max_skips_in_row
        self.skipped_in_row = 0
        self.skipped_total = 0

    def lower(self, *args, **kwargs):
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, params, delta, opt_state, batch, key):
        args = (params, delta, opt_state, batch, key)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args)):
            # Traced (inside jit/scan): the step without its own compile options (only a
            # top-level jit takes them), and the per-step flags only.
            return self.nested(*args)
        try:
            delta, opt_state, metrics = self.jitted(*args)
        except (ValueError, RuntimeError) as e:
            deleted = _deleted_leaf(args)
            if deleted is None:
                raise
            raise DonatedBufferError(
                f"train step: {deleted} has been deleted"
                + (" (donated to an earlier call of this step: its buffers were reused for that "
                   "call's outputs)" if self.donate else "")
                + ". Pass the delta and optimizer state the previous step returned "
                "(delta, opt_state, metrics = step(params, delta, opt_state, batch, key)); to "
                "keep the inputs alive, make_train_step(..., donate=False) (no in-place update: "
                "the step then holds both copies)") from e
        if not self.skip_nonfinite:
            return delta, opt_state, metrics
        skipped = bool(metrics["skipped"])
        self.skipped_in_row = self.skipped_in_row + 1 if skipped else 0
        self.skipped_total += skipped
        metrics = {**metrics, "skipped_in_row": self.skipped_in_row,
                   "skipped_total": self.skipped_total}
        if self.max_skips_in_row is not None and self.skipped_in_row >= self.max_skips_in_row:
            raise NonFiniteError(
                f"{self.skipped_in_row} train steps in a row had a non-finite loss or gradient "
                f"(last loss {float(metrics['loss'])}); each was skipped, the delta and optimizer "
                f"state are those of the last good step (on this error: .delta, .opt_state). Look "
                f"for NaN/inf in the data, a learning rate that diverges, or a low-precision "
                f"overflow", delta, opt_state, metrics)
        return delta, opt_state, metrics


class DonatedBufferError(ValueError):
    """A train step was given an array whose buffer was deleted (donated to an earlier step)."""


ARGUMENTS = ("params", "delta", "opt_state", "batch", "key")


def _deleted_leaf(args: tuple) -> str | None:
    """``"<argument><key path>"`` of the first deleted array among a step's ``args``."""
    for name, arg in zip(ARGUMENTS, args):
        for path, leaf in jax.tree_util.tree_leaves_with_path(arg):
            if isinstance(leaf, jax.Array) and leaf.is_deleted():
                return f"{name}{jax.tree_util.keystr(path)}"
    return None


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    method: method_lib.Method | None = None, donate: bool = True,
                    skip_nonfinite: bool = True, max_skips_in_row: int | None = 10,
                    param_shardings: Any = None, delta_shardings: Any = None,
                    opt_state_shardings: Any = None, batch_shardings: Any = None,
                    compiler_options: Mapping[str, Any] | None = None) -> TrainStep:
    """A jit-compiled train step that differentiates ``loss_fn`` with respect to the delta only.

    Args:
      loss_fn: ``(params, delta, batch, key) -> loss`` or ``-> (loss, metrics_dict)``; ``params`` are
        the frozen base weights, passed as a jit argument (not baked in as constants).
      optimizer: any optax transformation (``jpeft.partition`` for per-part optimizers).
      method: fold in the method's training additions: its ``penalty(delta)`` is added to the
        loss (reported as ``metrics["penalty"]``) and its ``optimizer`` wrapper wraps
        ``optimizer`` (:func:`method_optimizer`; give the same ``method`` to
        :func:`init_opt_state`).
      donate: donate the delta and optimizer-state buffers (updated in place): the arrays
        passed in are deleted by the call, use the returned ones; a later call given them raises
        :class:`DonatedBufferError`. ``False`` keeps them (the step then holds two copies).
      skip_nonfinite: skip a step whose loss or gradients are not all finite (module docstring);
        ``metrics["skipped"]`` says whether it was.
      max_skips_in_row: raise :class:`NonFiniteError` after this many skipped steps in a row
        (``None``: never).
      param_shardings, delta_shardings, opt_state_shardings, batch_shardings: optional explicit
        shardings; when given, the step is compiled with them as ``in_shardings``/``out_shardings``
        (the key and the metrics are replicated).
      compiler_options: XLA compile options of the step; ``None``: jpeft's defaults for the
        backend (:func:`jpeft.core.xla_options.train_step_options`: on CPU, YNNPACK fusions off,
        which cuts temporary memory by about a fifth, unless :func:`jpeft.retain_host_memory`
        is in force, then none); ``{}``: XLA's own defaults.

    Returns:
      a :class:`TrainStep`: ``step(params, delta, opt_state, batch, key) -> (delta, opt_state,
      metrics)`` where ``metrics`` has ``"loss"``, everything the loss function returned, and the
      skip counts.
    """
    if max_skips_in_row is not None and max_skips_in_row < 1:
        raise ValueError(f"make_train_step: max_skips_in_row must be >= 1 or None, got "
                         f"{max_skips_in_row}")
    optimizer = method_optimizer(method, optimizer)
    penalty = None if method is None else method.penalty

    def step(params, delta, opt_state, batch, key):
        def objective(d):
            loss, aux = _split_aux(loss_fn(params, d, batch, key))
            if penalty is not None:
                aux["penalty"] = penalty(d)
                loss = loss + aux["penalty"]
            return loss, aux
        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(delta)

        def update(_):
            updates, new_state = optimizer.update(grads, opt_state, delta)
            return optax.apply_updates(delta, updates), new_state
        if not skip_nonfinite:
            new_delta, new_state = update(None)
            return new_delta, new_state, {"loss": loss, **aux}
        finite = all_finite(loss, grads)
        new_delta, new_state = jax.lax.cond(finite, update, lambda _: (delta, opt_state), None)
        return new_delta, new_state, {"loss": loss, **aux, "skipped": ~finite}

    options = (xla_options.train_step_options() if compiler_options is None
               else dict(compiler_options))
    kwargs: dict = {}
    if donate:
        kwargs["donate_argnums"] = (1, 2)
    given = [s is not None for s in (param_shardings, delta_shardings, opt_state_shardings)]
    if any(given):
        if not all(given):
            raise ValueError("make_train_step: give param_shardings, delta_shardings and "
                             "opt_state_shardings together (or none of them)")
        kwargs["in_shardings"] = (param_shardings, delta_shardings, opt_state_shardings,
                                  batch_shardings, None)
        kwargs["out_shardings"] = (delta_shardings, opt_state_shardings, None)
    return TrainStep(jax.jit(step, **kwargs, compiler_options=options or None), skip_nonfinite,
                     max_skips_in_row, nested=jax.jit(step, **kwargs), donate=donate)


def init_opt_state(optimizer: optax.GradientTransformation, delta: Any,
                   shardings: Any = None, *, method: method_lib.Method | None = None) -> Any:
    """``optimizer.init(delta)`` (wrapped by ``method``'s optimizer-side state, as in
    :func:`make_train_step`), placed with ``shardings`` when given."""
    optimizer = method_optimizer(method, optimizer)
    if shardings is None:
        return jax.jit(optimizer.init)(delta)
    return jax.jit(optimizer.init, out_shardings=shardings)(delta)
