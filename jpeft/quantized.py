"""Quantized frozen bases (QLoRA, Dettmers et al. 2023): the base stored weight-only in int8 or NF4,
the delta trained on top.

::

    sites  = jpeft.probe(apply, params, *inputs)
    qparams = jpeft.quantize_params(params, sites, scheme="nf4")   # linear weights -> NF4
    qapply = jpeft.dequantizing(apply)                             # qapply(qparams, *inputs)
    qsites = jpeft.probe(qapply, qparams, *inputs)
    delta  = jpeft.lora("all-linear", rank=8).init(key, qparams, qsites)   # float32 factors
    logits = jpeft.wrap(qapply, method, qsites)(qparams, delta, *inputs)

:func:`quantize_params` replaces the selected weights of a parameter tree by
:class:`~jpeft.ops.quantize.QuantizedArray` s (:mod:`jpeft.ops.quantize`: int8 per output channel,
or NF4 in blocks of 64 along each row with double-quantized block scales, two codes per byte,
every stored array in the weight's own layout so that it shards like the weight); by default every
linear weight as Hugging Face PEFT's ``"all-linear"`` finds them (not embeddings, not the output
head, which bitsandbytes also leaves in full precision). The tree keeps its paths: a quantized
weight is one node at the weight's path (its stored arrays are its children).

:func:`dequantizing` wraps the model's apply function: every quantized weight is dequantized in
the forward pass (inside the caller's ``jit``; XLA fuses the decoding into the consumer where it
can) and named as the weight at its path (:func:`jpeft.weight`), so the data-flow backend sees its
contractions as those of that weight: LoRA and the other contraction methods add their factored
edits there, IA3 and the adapters act on activations as on any base. The delta's dtype follows the
mixed-precision policy (:mod:`jpeft.core.precision`: float32 on a low-precision base).

Merging into a quantized weight is refused (it would silently dequantize and requantize);
:func:`dequantize_params` gives the full-precision base to merge into.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jpeft.core import dataflow
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib
from jpeft.ops import quantize as q_lib

SCHEMES = ("nf4", "int8")
QuantizedArray = q_lib.QuantizedArray


def quantize_params(params: Any, sites: sites_lib.Sites, *, scheme: str = "nf4",
                    targets: paths_lib.Targets | str = "all-linear",
                    exclude: paths_lib.Targets = (), block_size: int = 64,
                    double_quant: bool = True) -> Any:
    """``params`` with the selected contraction weights stored quantized.

    Args:
      params: the base parameter tree (arrays).
      sites: the model's sites (:func:`jpeft.probe`), which say which leaves are linear weights
        and how each is contracted.
      scheme: ``"nf4"`` (:func:`jpeft.ops.quantize.quantize_nf4`, ``block_size``,
        ``double_quant``) or ``"int8"`` (:func:`jpeft.ops.quantize.quantize_int8`, one scale per
        output channel: per slice of the weight's stacked axes and entry of its output axes).
      targets: ``"all-linear"`` (every dot-contraction weight but output heads and embeddings,
        as PEFT's rule) or module/leaf paths (:mod:`jpeft.core.paths`).
      exclude: paths to keep in full precision.

    Raises:
      ValueError: an unknown scheme; a selection that matches nothing or a weight that is not a
        dot/ragged contraction weight (:func:`jpeft.core.sites.select`).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize_params: scheme must be one of {SCHEMES}, got {scheme!r}")
    all_linear = targets == "all-linear"
    sel = paths_lib.Selection(targets=None if all_linear else targets, exclude=exclude)
    chosen = sites_lib.select(params, sites, sel, what="quantize_params",
                              kinds=("dot", "ragged"), all_weights=all_linear)
    flat = paths_lib.flatten(params)
    upd = {}
    for path in chosen.chosen:
        w = flat[path]
        if paths_lib.is_array_node(w):
            raise ValueError(f"quantize_params: {paths_lib.path_str(path)} is already quantized")
        if scheme == "int8":
            layout = sites.contractions[path]
            upd[path] = q_lib.quantize_int8(w, axis=tuple(layout.stack) + tuple(layout.free))
        else:
            upd[path] = q_lib.quantize_nf4(w, block_size=block_size, double_quant=double_quant)
    return paths_lib.map_selected(lambda _, w, q: q, params, upd)


def dequantize_params(params: Any, dtype: Any = None) -> Any:
    """``params`` with every quantized weight dequantized (in ``dtype``, default its own): the
    full-precision base a merge can go into."""
    return jax.tree_util.tree_map(
        lambda x: q_lib.dequantize(x, dtype) if paths_lib.is_array_node(x) else x, params,
        is_leaf=paths_lib.is_array_node)


#: ``dequantizing``'s rematerialisation policies: ``"dots"`` keeps only the matrix products'
#: outputs from the forward pass for the backward pass and recomputes the rest, the dequantized
#: weights included (``jax.checkpoint_policies.dots_saveable``); ``None`` keeps whatever autodiff
#: keeps, the dequantized weights included.
REMAT = {"dots": jax.checkpoint_policies.dots_saveable, None: None}


def dequantizing(apply_fn: Callable[..., Any], *, remat: str | None = "dots",
                 shardings: Any = None) -> Callable[..., Any]:
    """``apply_fn`` for a parameter tree holding quantized weights: each is dequantized in the
    forward pass and named as the weight at its path (:func:`jpeft.weight`), then ``apply_fn``
    runs on the full-precision values. Pure and jit-safe; a tree without quantized weights runs
    as it is.

    ``remat``: what the backward pass gets from the forward pass. Differentiated as it is, the
    dequantized weights are kept for the backward pass (the products' input gradients need them):
    a full-precision copy of every weight for the whole step, on an accelerator more memory than
    the unquantized model needs (``benchmarks/results/qlora_scale.jsonl``, H200: peak 9.35 GB
    against 9.18 GB for the bf16 base). ``"dots"`` (default) rematerialises everything but the
    matrix products' outputs, so the weights are dequantized again in the backward pass, as
    bitsandbytes does (peak 8.83 GB there; the step 1.17x the bf16 base's time); ``None`` keeps
    them (1.05x). A model that rematerialises its layers itself (``LlamaConfig.remat``,
    ``nnx.remat``/``nn.remat`` layers) wants ``remat=None``: the outer ``"dots"`` remat would keep
    every product's output of the whole forward, the attention scores' included, for the
    backward pass (``tests/test_plan.py`` measures it). A stack of layers run by ``scan`` is
    dequantized whole before the scan (the stacked weight is one quantized array), so its
    full-precision copy is alive while the stack runs: on such a model QLoRA saves the base's
    storage between steps, not the step's peak.

    ``shardings``: on a mesh, the shardings of the full-precision parameter tree (the layout the
    unquantized weights would have, e.g. :func:`jpeft.models.sharding_rules.param_shardings` of
    it): each dequantized weight is constrained to its own. The stored arrays keep the weight's
    layout (:func:`jpeft.ops.quantize.stored_shardings`), so stored arrays sharded by
    :func:`jpeft.models.sharding_rules.param_shardings` already dequantize to that sharding; the
    constraint pins it where they do not (a replicated stored array, or shardings of another
    origin), so that no full-precision weight is kept whole on every device.

    Raises:
      ValueError: an unknown ``remat``; (when called) a quantized weight with no sharding in
        ``shardings``.
    """
    if remat not in REMAT:
        raise ValueError(f"dequantizing: remat must be one of {list(REMAT)}, got {remat!r}")
    policy = REMAT[remat]
    by_path = None if shardings is None else paths_lib.flatten(shardings)

    def apply(params, *args, **kwargs):
        def run(params):
            def one(kp, x):
                if not paths_lib.is_array_node(x):
                    return x
                path, w = paths_lib.to_path(kp), q_lib.dequantize(x)
                if by_path is not None:
                    if path not in by_path:
                        raise ValueError(f"dequantizing: no sharding for the quantized weight "
                                         f"{paths_lib.path_str(path)} in shardings (pass the "
                                         f"shardings of the full-precision parameter tree)")
                    w = jax.lax.with_sharding_constraint(w, by_path[path])
                return dataflow.weight(w, path)
            full = jax.tree_util.tree_map_with_path(one, params, is_leaf=paths_lib.is_array_node)
            return apply_fn(full, *args, **kwargs)
        if policy is not None:
            run = jax.checkpoint(run, policy=policy)
        return run(params)
    return apply
