"""LoRA (Hu et al., 2021, arXiv 2106.09685): a low-rank update of selected weight matrices.

For a weight ``W0: [in, out]`` (Flax layout, ``y = x @ W0 + b``)::

    W = W0 + s * A @ B,    A: [in, r],  B: [r, out],   s = alpha / r   (rsLoRA: alpha / sqrt(r))

``A`` is random (Kaiming-uniform with bound ``1/sqrt(in)``, Hugging Face PEFT's default, or Gaussian
with std ``1/r``) and ``B = 0``, so training starts exactly at the base model. The trainable count
is ``sum r * (in + out)`` over the adapted matrices (73,728 for q, v at r = 8 on a 6-layer, 384-wide
BERT).

Two forward forms, chosen by :func:`jpeft.wrap`'s ``mode``:

* ``"factored"`` (default): ``y = x @ W0 + b + s * (dropout(x) @ A) @ B``. The frozen ``W0`` only
  enters as a constant, so the backward pass never forms the ``[in, out]`` gradient of ``W0``; it
  costs ``O(tokens * r * (in + out))`` extra FLOPs. Needs the model to call ``flax.linen.Dense``.
* ``"materialised"``: ``apply(W0 + s * A @ B)``; works for any apply function, but the backward pass
  computes a full ``[in, out]`` gradient for every adapted matrix (and cannot apply dropout).

Merging gives zero-overhead inference; unmerging restores ``W0`` up to float rounding.

The delta mirrors the base tree: at the path of each adapted kernel it holds
``{"lora_A": A, "lora_B": B}``. ``A`` takes the sharding of ``W0``'s input axis and ``B`` that of its
output axis; the rank axis is replicated.
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
from jpeft.core import intercept
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sharding as sharding_lib

ALL_LINEAR = "all-linear"
#: Which axis of ``W [in, out]`` each factor axis shares (``None``: the replicated rank axis).
FACTOR_AXES = {"lora_A": (0, None), "lora_B": (None, 1)}


def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _init_a(key, shape, dtype, init: str, rank: int):
    fan_in = shape[0]
    if init == "kaiming":        # torch kaiming_uniform_(a=sqrt(5)) on [r, in]: bound 1/sqrt(in)
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    if init == "gaussian":       # Hugging Face PEFT init_lora_weights="gaussian": std 1/r
        return jax.random.normal(key, shape, dtype) / rank
    raise ValueError(f"lora: init must be 'kaiming' or 'gaussian', got {init!r}")


def _dropout(key, x, rate: float):
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, x.shape)
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


def lora(targets: paths_lib.Targets | str = ("query", "value"), rank: int = 8, alpha: float = 8.0,
         *, use_rslora: bool = False, dropout: float = 0.0, init: str = "kaiming",
         kernel_names: Sequence[str] = ("kernel",),
         layers_to_transform: int | Sequence[int] | None = None,
         layers_pattern: str | None = None,
         exclude: paths_lib.Targets = ()) -> method_lib.Method:
    """LoRA on the 2-D kernels of the modules matched by ``targets``.

    Args:
      targets: module paths (see :mod:`jpeft.core.paths`), or ``"all-linear"`` for every 2-D kernel
        (combine with ``exclude`` to leave out a task head, as Hugging Face PEFT does).
      rank: ``r``, at most ``min(in, out)`` of every adapted matrix.
      alpha: scale numerator; ``s = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
      dropout: dropout rate on the input of ``A`` (factored mode, when a ``delta_rng`` is given).
      init: ``"kaiming"`` (uniform, bound ``1/sqrt(in)``) or ``"gaussian"`` (std ``1/r``) for ``A``.
      kernel_names: leaf names of weight matrices.
      layers_to_transform, layers_pattern, exclude: narrow the selection.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora: rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora: dropout must be in [0, 1), got {dropout}")
    if init not in ("kaiming", "gaussian"):
        raise ValueError(f"lora: init must be 'kaiming' or 'gaussian', got {init!r}")
    s = scaling(rank, alpha, use_rslora)
    sel = paths_lib.Selection(
        targets=None if targets == ALL_LINEAR else targets, leaf_names=tuple(kernel_names),
        layers_to_transform=layers_to_transform, layers_pattern=layers_pattern,
        exclude=exclude, ndim=2)

    def init_fn(key, params):
        selected = paths_lib.select(params, sel, what="lora")
        flat = paths_lib.flatten(params)
        out = {}
        for i, path in enumerate(selected):
            w = flat[path]
            d_in, d_out = w.shape
            if rank > min(d_in, d_out):
                raise ValueError(
                    f"lora: rank {rank} is larger than the matrix {paths_lib.path_str(path)} of shape "
                    f"{tuple(w.shape)} allows (at most min(in, out) = {min(d_in, d_out)})")
            a = _init_a(jax.random.fold_in(key, i), (d_in, rank), w.dtype, init, rank)
            out[path] = {"lora_A": a, "lora_B": jnp.zeros((rank, d_out), w.dtype)}
        return paths_lib.unflatten(out)

    def pairs(delta) -> dict:
        flat = paths_lib.flatten(delta)
        return {p[:-1]: (flat[p[:-1] + ("lora_A",)], flat[p]) for p in flat if p[-1] == "lora_B"}

    def delta_w(a, b, dtype):
        return (s * (a.astype(jnp.float32) @ b.astype(jnp.float32))).astype(dtype)

    def merge(params, delta):
        return paths_lib.map_selected(lambda _, w, ab: w + delta_w(*ab, w.dtype), params, pairs(delta))

    def unmerge(params, delta):
        return paths_lib.map_selected(lambda _, w, ab: w - delta_w(*ab, w.dtype), params, pairs(delta))

    def prepare(params, delta, context):
        if context.mode == "materialised":
            return merge(params, delta), ()
        edits = {}
        for path, (a, b) in pairs(delta).items():
            key = None
            if context.rng is not None and dropout > 0.0:
                key = jax.random.fold_in(context.rng, zlib.crc32(paths_lib.path_str(path).encode()))

            def edit(x, y, a=a, b=b, key=key):
                if key is not None:
                    x = _dropout(key, x, dropout)
                return y + (s * ((x @ a.astype(x.dtype)) @ b.astype(x.dtype))).astype(y.dtype)
            edits[path[:-1]] = edit
        return params, (intercept.DenseInterceptor(edits, "lora"),)

    def shardings(param_shardings, delta):
        return sharding_lib.follow_weight_axes(param_shardings, delta, FACTOR_AXES)

    config = {"method": "lora", "targets": targets, "rank": rank, "alpha": alpha,
              "use_rslora": use_rslora, "dropout": dropout, "init": init,
              "kernel_names": list(kernel_names), "layers_to_transform": layers_to_transform,
              "layers_pattern": layers_pattern, "exclude": exclude, "scaling": s}
    return method_lib.Method(
        name="lora", init=init_fn, merge=merge, unmerge=unmerge, prepare=prepare,
        shardings=shardings, labels=method_lib.constant_labels("lora"), config=config)
