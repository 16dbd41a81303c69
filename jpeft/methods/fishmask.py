"""FishMask (Sung, Nair and Raffel, 2021, "Training Neural Networks with Fixed Sparse Masks",
arXiv 2111.09839): train only the entries with the largest empirical Fisher information.

The diagonal of the empirical Fisher over ``N`` examples ``(x_i, y_i)`` with their *true* labels::

    F = (1 / N) sum_i (grad_theta log p(y_i | x_i; theta))^2          (elementwise, shape of theta)

is computed from per-example gradients (``jax.vmap(jax.grad(logprob_fn))``) in chunks of
``chunk_size`` examples: one jitted function maps ``(running_sum, params, chunk) -> running_sum``,
so memory is ``O(chunk_size * |theta|)`` for any ``N``. It adds the examples' squared gradients
one at a time in data order, so the sum itself does not depend on ``chunk_size`` (what can, in the
last bits, is XLA's arithmetic for the per-example gradients of a chunk of another size), and a
fixed data order gives the same result on every run. The last chunk is padded with weight-0
copies of an example.

The mask keeps the global top ``k`` entries of ``F`` over the selected tensors (paper: 0.5% of the
parameters, ``N = 1024``) and is fixed; :func:`fishmask` trains exactly those entries
(:func:`jpeft.core.sparse.sparse_finetune`: zero-initialised values, so training starts at the base
model; stored sparse).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sparse as sparse_lib

LogProbFn = Callable[[Any, Any], jax.Array]


def label_log_likelihood(logits_fn: Callable[[Any, Any], jax.Array],
                         label_key: str = "labels") -> LogProbFn:
    """``logprob_fn(params, example) = log_softmax(logits_fn(params, example))[example[label_key]]``.

    ``logits_fn(params, example) -> [C]`` computes a classifier's logits for *one* example (a dict
    holding ``label_key``); the result is the log-likelihood of the example's true label, the
    quantity whose squared gradient is the empirical Fisher.
    """
    def logprob(params, example):
        logits = logits_fn(params, example)
        return jax.nn.log_softmax(logits.astype(jnp.float32))[example[label_key]]
    return logprob


def _num_examples(examples: Any) -> int:
    leaves = jax.tree_util.tree_leaves(examples)
    if not leaves:
        raise ValueError("fisher_information: no examples (the example tree is empty)")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"fisher_information: every leaf of examples needs the same leading "
                         f"(example) axis; got leading sizes {sorted(sizes)}")
    return sizes.pop()


def fisher_information(logprob_fn: LogProbFn, params: Any, examples: Any, *,
                       chunk_size: int = 8) -> Any:
    """The diagonal empirical Fisher ``F = mean_i (grad_params logprob_fn(params, example_i))^2``.

    Args:
      logprob_fn: ``(params, example) -> scalar`` log-likelihood ``log p(y_i | x_i)`` of one example
        (no batch axis) under its true label (e.g. :func:`label_log_likelihood`); it must be
        deterministic (no dropout).
      params: the tree to differentiate (the base parameters, or the part of them to score).
      examples: a pytree of arrays whose leaves share a leading example axis ``N >= 1``.
      chunk_size: examples per compiled call (memory ``O(chunk_size * |params|)``).

    Returns:
      a float32 tree shaped like ``params``.

    Raises:
      ValueError: no examples, mismatched leading axes, or ``chunk_size < 1``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"fisher_information: chunk_size must be a positive integer, got "
                         f"{chunk_size!r}")
    n = _num_examples(examples)
    if n == 0:
        raise ValueError("fisher_information: no examples (N = 0); the empirical Fisher needs at "
                         "least one labelled example")
    per_example = jax.vmap(jax.grad(logprob_fn), in_axes=(None, 0))

    def add_chunk(acc, params, chunk, weight):
        grads = per_example(params, chunk)                   # leaves [c, *shape]

        def body(i, acc):                                    # one example at a time, in order
            return jax.tree_util.tree_map(
                lambda a, g: a + jnp.where(weight[i] > 0, jnp.square(g[i].astype(jnp.float32)), 0.0),
                acc, grads)
        return jax.lax.fori_loop(0, weight.shape[0], body, acc)

    step = jax.jit(add_chunk, donate_argnums=(0,))
    acc = jax.tree_util.tree_map(lambda p: jnp.zeros(np.shape(p), jnp.float32), params)
    c = min(chunk_size, n)
    for start in range(0, n, c):
        stop = min(start + c, n)
        pad = c - (stop - start)
        chunk = jax.tree_util.tree_map(
            lambda x: jnp.concatenate([jnp.asarray(x[start:stop]),
                                       jnp.repeat(jnp.asarray(x[start:start + 1]), pad, axis=0)]),
            examples)
        weight = jnp.asarray(np.arange(c) < stop - start, jnp.float32)
        acc = step(acc, params, chunk, weight)
    return jax.tree_util.tree_map(lambda a: a / n, acc)


def fishmask_indices(fisher: Any, *, density: float | None = None, k: int | None = None,
                     targets: paths_lib.Targets = None, leaf_names: Sequence[str] | None = None,
                     layers_to_transform: int | Sequence[int] | None = None,
                     layers_pattern: str | None = None, exclude: paths_lib.Targets = ()) -> dict:
    """The fixed mask: the global top-``k`` Fisher entries among the selected tensors.

    Args:
      fisher: a Fisher tree (:func:`fisher_information`), shaped like the base parameters.
      density: fraction of the *selected* tensors' entries to keep, in ``(0, 1]``
        (``k = round(density * n_selected)``); or give ``k``.
      targets, leaf_names, layers_to_transform, layers_pattern, exclude: which tensors compete
        (see :mod:`jpeft.core.paths`; e.g. ``exclude=("classifier",)`` when the head is trained in
        full alongside).

    Returns:
      ``{..path..: int32 [k_leaf]}`` sorted flat positions, ``sum k_leaf == k``; ties go to the
      earlier position in tree order.
    """
    sel = paths_lib.Selection(targets=targets, leaf_names=leaf_names,
                              layers_to_transform=layers_to_transform,
                              layers_pattern=layers_pattern, exclude=exclude)
    flat = paths_lib.flatten(fisher)
    chosen = paths_lib.select(fisher, sel, what="fishmask")
    return sparse_lib.top_k_indices(paths_lib.unflatten({p: flat[p] for p in chosen}),
                                    k=k, density=density, what="fishmask")


def fishmask(indices: Any, *, name: str = "fishmask") -> method_lib.Method:
    """Train only the masked entries ``indices`` (:func:`fishmask_indices`): a
    :func:`jpeft.core.sparse.sparse_finetune` method named ``name``."""
    m = sparse_lib.sparse_finetune(indices, name=name)
    return m._replace(config={**m.config, "method": "fishmask"})
