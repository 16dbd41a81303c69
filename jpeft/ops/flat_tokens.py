"""Per-token layers differentiated on flattened tokens.

A layer that acts on the last axis of ``x: [..., F]`` independently per token (a dense map, a layer
norm) gives the same values on ``x`` as on ``x.reshape(N, F)`` (``N`` = product of the leading
axes). Their gradients are the same products and sums too, but not the same programs: autodiff of
the ``[B, T, F]`` form sums the bias and scale gradients over two axes, which XLA:CPU (with
YNNPACK's fusions off, :mod:`jpeft.core.xla_options`) runs as a windowed reduction about 4x slower
than the sum of ``[N, F]`` over ``N`` (``[32, 64, 1536]``: 8.6 vs 2.1 ms), and a full
fine-tuning step of the embedded MiniLM takes about 1.15x the time of the same model written on
flattened tokens (``benchmarks/README.md``).

:func:`per_token` keeps the layer's own form as its primal computation, which is what
:func:`jpeft.probe` and :func:`jpeft.wrap` read (the primal declares its rule autodiff's own with
:func:`jpeft.same_derivative`, so they inline it: a contraction keeps its batch axis, so
per-example edits still see it), and gives ``jax.vjp`` / ``jax.grad`` a forward and
backward pass on the flattened tokens (``jax.custom_vjp``; forward-mode differentiation of the
result is not defined, as for every custom VJP).
"""

from __future__ import annotations

from typing import Callable

import jax

from jpeft.core import dataflow

Array = jax.Array


def per_token(fn: Callable[..., Array]) -> Callable[..., Array]:
    """``fn(x, *params)`` (``x: [..., F] -> [..., F']``, each token independent of the others)
    with its reverse-mode derivative computed on ``x.reshape(N, F)``.

    ``params`` are arrays that do not carry the token axes (weights, biases, scales); anything
    static belongs in ``fn``'s closure. The result equals ``fn(x, *params)`` and its gradients
    equal autodiff's up to summation order."""

    @jax.custom_vjp
    def f(x, *params):
        return dataflow.same_derivative(fn(x, *params))

    def fwd(x, *params):
        y, vjp = jax.vjp(fn, x.reshape(-1, x.shape[-1]), *params)
        return y.reshape(*x.shape[:-1], y.shape[-1]), vjp

    def bwd(vjp, g):
        dx, *dparams = vjp(g.reshape(-1, g.shape[-1]))
        return (dx.reshape(*g.shape[:-1], dx.shape[-1]), *dparams)

    f.defvjp(fwd, bwd)
    return f
