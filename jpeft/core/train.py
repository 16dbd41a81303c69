"""Training with respect to the delta only.

``loss(delta) = task_loss(f(params, delta, batch))``: gradients are taken with respect to the delta
alone (``argnums`` of the delta), so no gradient is ever formed for a frozen weight, and the
optimizer's state exists only for the delta. The step is a pure function,
``(params, delta, opt_state, batch, key) -> (delta, opt_state, metrics)``, jit-compiled with the
delta's and the optimizer state's buffers donated.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

from jpeft.core import method as method_lib

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


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    method: method_lib.Method | None = None, donate: bool = True,
                    param_shardings: Any = None, delta_shardings: Any = None,
                    opt_state_shardings: Any = None, batch_shardings: Any = None):
    """A jit-compiled train step that differentiates ``loss_fn`` with respect to the delta only.

    Args:
      loss_fn: ``(params, delta, batch, key) -> loss`` or ``-> (loss, metrics_dict)``; ``params`` are
        the frozen base weights, passed as a jit argument (not baked in as constants).
      optimizer: any optax transformation (``jpeft.partition`` for per-part optimizers).
      method: fold in the method's training additions: its ``penalty(delta)`` is added to the
        loss (reported as ``metrics["penalty"]``) and its ``optimizer`` wrapper wraps
        ``optimizer`` (:func:`method_optimizer`; give the same ``method`` to
        :func:`init_opt_state`).
      donate: donate the delta and optimizer-state buffers (updated in place on accelerators).
      param_shardings, delta_shardings, opt_state_shardings, batch_shardings: optional explicit
        shardings; when given, the step is compiled with them as ``in_shardings``/``out_shardings``
        (the key and the metrics are replicated).

    Returns:
      ``step(params, delta, opt_state, batch, key) -> (delta, opt_state, metrics)`` where ``metrics``
      has ``"loss"`` and everything the loss function returned.
    """
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
        updates, opt_state = optimizer.update(grads, opt_state, delta)
        delta = optax.apply_updates(delta, updates)
        return delta, opt_state, {"loss": loss, **aux}

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
    return jax.jit(step, **kwargs)


def init_opt_state(optimizer: optax.GradientTransformation, delta: Any,
                   shardings: Any = None, *, method: method_lib.Method | None = None) -> Any:
    """``optimizer.init(delta)`` (wrapped by ``method``'s optimizer-side state, as in
    :func:`make_train_step`), placed with ``shardings`` when given."""
    optimizer = method_optimizer(method, optimizer)
    if shardings is None:
        return jax.jit(optimizer.init)(delta)
    return jax.jit(optimizer.init, out_shardings=shardings)(delta)
