"""Full training of selected parameters: a task head, or the whole model as a baseline.

The delta holds the trained values themselves: one array per selected leaf, at that leaf's path,
initialised as a copy of the base value (``delta[p] = theta_0[p]``), and the forward pass runs with
those leaves replaced::

    theta[p] = delta[p]      (p selected)        theta[p] = theta_0[p]      (otherwise)

This is ordinary training of those parameters, as the hand-written step of
``benchmarks/floor.py``, PyTorch and Hugging Face PEFT's ``modules_to_save`` do it: the optimizer
sees the weights, so AdamW's weight decay pulls them towards zero (not towards ``theta_0``), and the
forward pass adds nothing (no ``theta_0 + delta`` pass over the weights each step).
``full_finetune()`` with no targets is full fine-tuning (the reference point of the benchmarks);
``full_finetune(("classifier",))`` trains a classification head.

``merge`` writes the delta into the tree; there is no ``unmerge`` (the replaced base values are
not recoverable from the merged tree). Under :func:`jpeft.active` a later part of this kind
replaces what earlier parts merged into the same leaves.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp

from jpeft.core import additive
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib


def init_copy(params: Any, selected: list[paths_lib.Path]) -> dict:
    """Nested dict with a copy of each selected leaf at its path (new buffers: the delta can be
    donated to a train step while ``params`` stays valid)."""
    flat = paths_lib.flatten(params)
    return paths_lib.unflatten({p: jnp.copy(flat[p]) for p in selected})


def replace(params: Any, delta: Any) -> Any:
    """``params`` with each leaf at a path of ``delta`` replaced by the delta's value (cast to the
    base leaf's dtype: a float32 delta trains a bfloat16 model's leaves in float32)."""
    return paths_lib.map_selected(lambda _, w, d: d.astype(w.dtype), params,
                                  paths_lib.flatten(delta))


def full_finetune(targets: paths_lib.Targets = None, *,
                  leaf_names: Sequence[str] | None = None,
                  layers_to_transform: int | Sequence[int] | None = None,
                  layers_pattern: str | None = None,
                  exclude: paths_lib.Targets = (),
                  name: str = "full") -> method_lib.Method:
    """Train every leaf (or those named ``leaf_names``) of the modules matched by ``targets``
    (``None``: every leaf of the model).

    Returns:
      A :class:`~jpeft.core.method.Method` whose delta is ``{path: theta[path]}`` for the selected
      leaves (same shapes, dtypes and shardings as the base), initialised to the base values.

    Raises:
      ValueError: ``targets`` (with the other selectors) match no leaf; the message lists the
        modules that exist.
    """
    sel = paths_lib.Selection(targets=targets, leaf_names=leaf_names,
                              layers_to_transform=layers_to_transform,
                              layers_pattern=layers_pattern, exclude=exclude)
    config = {"method": "full", "targets": targets, "leaf_names": leaf_names,
              "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern,
              "exclude": exclude, "name": name}

    def init(key, params, sites=None):
        del key, sites
        return init_copy(params, paths_lib.select(params, sel, what=name))

    merge = lambda params, delta, sites=None: replace(params, delta)
    return method_lib.Method(
        name=name, init=init, merge=merge, unmerge=None, edits=method_lib.merge_edits(merge),
        shardings=additive.same_shardings, labels=method_lib.constant_labels(name),
        config=config)
