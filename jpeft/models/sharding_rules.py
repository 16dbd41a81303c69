"""Named sharding layouts for the reference models (LLaMA decoder, BERT encoder).

A layout says where every base weight and the batch live on a ``("data", "model")`` mesh; the
delta and optimizer state then follow the weights (:func:`jpeft.delta_shardings`,
:func:`jpeft.opt_state_shardings`), so a method never needs rules of its own.

* ``"dp"``: data parallel. Weights replicated; the batch split over every device.
* ``"fsdp"``: fully sharded data parallel. Each matrix split over every device along its model
  (hidden) axis, gathered layer by layer by XLA where it is used; the batch split over every
  device.
* ``"tp"``: tensor parallel (Megatron). The projections into heads and the FFN's first products
  (``q, k, v``, ``gate, up``; BERT's ``query, key, value``, ``intermediate``) split by output
  column over ``"model"``, the products back to the hidden size (``o``, ``down``; BERT's
  ``output`` denses) by input row, so each block needs one all-reduce; the batch split over
  ``"data"``.
* ``"fsdp_tp"``: both. The tensor-parallel axis as in ``"tp"``, the other axis of each matrix
  split over ``"data"``; the batch over ``"data"``.

A :class:`Layout` on other axis names works the same (the planner's ``("dp", "fsdp", "tp")``
mesh: ``Layout(fsdp="fsdp", tp="tp", batch=("dp", "fsdp"))``).

Rules match by module name (Hugging Face's names, as both models use them) and apply to a
leaf's trailing axes: a ``scan``-stacked ``[L, in, out]`` kernel gets the spec of its
``[in, out]`` matrix with the layer axis replicated. Norm scales and biases are replicated (they
are small). Every spec is checked against the mesh (:func:`sharding_fn`: an axis that does not
divide is an error naming the leaf); the same function places each slice of a checkpoint read
straight onto the mesh (:func:`jpeft.models.load_hf_llama_sharded`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jpeft.core import paths as paths_lib
from jpeft.core.sharding import axis_size
from jpeft.ops import quantize as q_lib

#: Mesh axis names of the named layouts.
DATA, MODEL = "data", "model"
ALL = (DATA, MODEL)


class Layout(NamedTuple):
    """Which mesh axes split what: ``fsdp`` (axis or axes) splits each matrix along its hidden
    axis, ``tp`` (an axis) splits the projections by column or row, ``batch`` (axes) splits the
    batch's leading axis; ``None``: not split that way."""
    fsdp: str | tuple[str, ...] | None
    tp: str | None
    batch: tuple[str, ...]


#: The named layouts on a ``("data", "model")`` mesh (module docstring).
LAYOUTS = {
    "dp": Layout(fsdp=None, tp=None, batch=ALL),
    "fsdp": Layout(fsdp=ALL, tp=None, batch=ALL),
    "tp": Layout(fsdp=None, tp=MODEL, batch=(DATA,)),
    "fsdp_tp": Layout(fsdp=DATA, tp=MODEL, batch=(DATA,)),
}

#: Per model: name pattern -> the role of the matrix (``"column"``: split by output column
#: under tensor parallelism; ``"row"``: by input row; ``"embed"``: ``[vocab, hidden]``;
#: ``"head"``: ``[hidden, out]``, never split by output: vocabularies and label counts need not
#: divide the mesh).
ROLES = {
    "llama": (
        (r"(.*/)?self_attn/(q|k|v)_proj/kernel", "column"),
        (r"(.*/)?mlp/(gate|up)_proj/kernel", "column"),
        (r"(.*/)?self_attn/o_proj/kernel", "row"),
        (r"(.*/)?mlp/down_proj/kernel", "row"),
        (r"(.*/)?embed_tokens/embedding", "embed"),
        (r"(.*/)?lm_head/kernel", "head"),
    ),
    "bert": (
        (r"(.*/)?attention/self/(query|key|value)/kernel", "column"),
        (r"(.*/)?intermediate/dense/kernel", "column"),
        (r"(.*/)?output/dense/kernel", "row"),
        (r"(.*/)?(word|position|token_type)_embeddings/embedding", "embed"),
        (r"(.*/)?(pooler/dense|classifier)/kernel", "head"),
    ),
}


def layout_of(layout: str | Layout) -> Layout:
    """``layout`` itself, or the named one (:data:`LAYOUTS`)."""
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {tuple(LAYOUTS)} or give a "
                         f"Layout(fsdp=..., tp=..., batch=...)")
    return LAYOUTS[layout]


def matrix_spec(role: str, layout: str | Layout) -> P:
    """The ``PartitionSpec`` of a 2-D weight of ``role`` (:data:`ROLES`) under ``layout``:
    ``[in, out]`` kernels, ``[vocab, hidden]`` embeddings."""
    lay = layout_of(layout)
    return {
        "column": P(lay.fsdp, lay.tp),      # [hidden, out]: hidden over fsdp, columns over tp
        "row": P(lay.tp, lay.fsdp),         # [in, hidden]: rows over tp, hidden over fsdp
        "embed": P(None, lay.fsdp),         # [vocab, hidden]: hidden over fsdp
        "head": P(lay.fsdp, None),          # [hidden, out]
    }[role]


def batch_spec(layout: str | Layout) -> P:
    """Where the batch's leading axis lives: :attr:`Layout.batch` (every device for ``dp`` and
    ``fsdp``, ``"data"`` when tensor parallelism replicates the batch over ``"model"``)."""
    return P(layout_of(layout).batch)


def _role(model: str, path: str) -> str | None:
    if model not in ROLES:
        raise ValueError(f"no sharding rules for model {model!r}; choose from {sorted(ROLES)}")
    return next((role for pat, role in ROLES[model] if paths_lib.fullmatch(pat, path)), None)


def _axes_in(spec_axes) -> tuple[str, ...]:
    out = []
    for a in spec_axes:
        out += [] if a is None else list(a if isinstance(a, tuple) else (a,))
    return tuple(out)


def spec_of(model: str, layout: str | Layout, path: str, shape: tuple[int, ...]) -> P:
    """The ``PartitionSpec`` of the leaf at ``path`` (``'/'``-joined) of ``shape``:
    :func:`matrix_spec` on a matrix's last two axes (leading stacked axes replicated),
    replicated for every other leaf."""
    role = _role(model, path) if len(shape) >= 2 else None
    axes = () if role is None else (*(None,) * (len(shape) - 2), *matrix_spec(role, layout))
    while axes and axes[-1] is None:            # P(None, None) is written P()
        axes = axes[:-1]
    return P(*axes)


def sharding_fn(mesh: Mesh, model: str, layout: str | Layout
                ) -> Callable[[str, tuple[int, ...]], NamedSharding]:
    """``(path, shape) -> NamedSharding`` of :func:`spec_of` on ``mesh``, checked: a mesh axis
    the layout names but the mesh lacks, or one that does not divide its dimension, is an error
    naming the leaf (what :func:`jpeft.models.load_hf_llama_sharded` takes)."""
    lay = layout_of(layout)
    missing = sorted({a for a in _axes_in((lay.fsdp, lay.tp, lay.batch))
                      if a not in mesh.axis_names})
    if missing:
        raise ValueError(f"layout {layout!r} names mesh axes {missing} that the mesh (axes "
                         f"{mesh.axis_names}) lacks")

    def one(path: str, shape: tuple[int, ...]) -> NamedSharding:
        spec = spec_of(model, lay, path, shape)
        for dim, axes in zip(shape, spec):
            size = axis_size(mesh, axes)
            if dim % size:
                raise ValueError(
                    f"sharding {model!r} {layout!r}: {path} {tuple(shape)}: dimension {dim} is "
                    f"not divisible by mesh axes {axes} of size {size}; use a mesh whose axes "
                    f"divide the model's sizes, or another layout")
        return NamedSharding(mesh, spec)
    return one


def param_shardings(params: Any, mesh: Mesh, model: str, layout: str | Layout) -> Any:
    """``NamedSharding`` per leaf of ``params`` (concrete or ``jax.ShapeDtypeStruct``) for
    ``model`` (``"llama"`` or ``"bert"``) under ``layout`` (:func:`sharding_fn`).

    A quantized weight (:class:`jpeft.QuantizedArray`) gets a tree of shardings of its own
    structure: its stored arrays are laid out like the weight (:mod:`jpeft.ops.quantize`: the
    weight's leading axes, then packed codes and block scales along its last axis), so each takes
    the weight's own spec (:func:`spec_of` of its logical shape, checked as for an unquantized
    weight) by :func:`jpeft.ops.quantize.stored_specs`: the leading axes as the weight's; the last
    axis of the NF4 codes and block scales as the weight's where every shard then holds whole
    blocks and whole bytes (``N / S`` a multiple of the block size and even, for a last dimension
    ``N`` over ``S`` devices), and **replicated** otherwise (each device then holds that weight's
    whole rows of codes and cuts its shard locally: correct, more bytes); the double-quantization
    constants' short last axis replicated, their offset replicated; int8 scales split on their
    channel axes. Each device then dequantizes its own shard of the weight, with no gather."""
    one = sharding_fn(mesh, model, layout)

    def leaf(kp, x):
        path = paths_lib.path_str(paths_lib.to_path(kp))
        if paths_lib.is_array_node(x):          # a QuantizedArray: its stored arrays
            return q_lib.stored_shardings(x, one(path, tuple(x.shape)))
        return one(path, tuple(x.shape))
    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=paths_lib.is_array_node)


def batch_shardings(batch: Any, mesh: Mesh, layout: str | Layout) -> Any:
    """``NamedSharding`` per leaf of ``batch``: its leading (example) axis by
    :func:`batch_spec`, the rest replicated."""
    spec = batch_spec(layout)
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, spec), batch)


_ACTIVATIONS: contextvars.ContextVar[NamedSharding | None] = contextvars.ContextVar(
    "jpeft_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, layout: str | Layout) -> Iterator[None]:
    """While tracing in this context, the reference models pin their activations' leading
    (batch) axis to ``layout``'s batch axes (:func:`constrain`), so XLA's partitioner keeps the
    batch split and gathers the FSDP-sharded weights, layer by layer, instead of gathering the
    activations (which it may pick otherwise: a 4096-token LLaMA-8B step then holds every
    sequence's attention scores on every device). Probe and lower the model inside it: a trace
    made outside carries no constraints."""
    token = _ACTIVATIONS.set(NamedSharding(mesh, batch_spec(layout)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x: jax.Array) -> jax.Array:
    """``x`` ``[B, ...]`` with its leading axis on the batch axes of the enclosing
    :func:`activation_sharding` (unchanged outside one)."""
    sharding = _ACTIVATIONS.get()
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def meshes(devices: Sequence[Any] | None = None) -> dict[str, Mesh]:
    """The ``("data", "model")`` meshes of the given devices (all by default) in every shape
    ``d x m`` with ``d * m`` equal to their number, keyed ``"dxm"``."""
    import numpy as np
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    return {f"{d}x{n // d}": Mesh(np.array(devices).reshape(d, n // d), ALL)
            for d in range(1, n + 1) if n % d == 0}
