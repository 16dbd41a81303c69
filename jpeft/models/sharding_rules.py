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

Rules match by module name (Hugging Face's names, as both models use them) and apply to a
leaf's trailing axes: a ``scan``-stacked ``[L, in, out]`` kernel gets the spec of its
``[in, out]`` matrix with the layer axis replicated. Norm scales and biases are replicated (they
are small). Every spec is checked against the mesh before use (:func:`jpeft.shard_by_rules`:
an axis that does not divide is an error naming the leaf).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jpeft.core import paths as paths_lib

LAYOUTS = ("dp", "fsdp", "tp", "fsdp_tp")
#: Mesh axis names the layouts use.
DATA, MODEL = "data", "model"
ALL = (DATA, MODEL)

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


def matrix_spec(role: str, layout: str) -> P:
    """The ``PartitionSpec`` of a 2-D weight of ``role`` (:data:`ROLES`) under ``layout``:
    ``[in, out]`` kernels, ``[vocab, hidden]`` embeddings."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    fsdp = {"dp": None, "fsdp": ALL, "tp": None, "fsdp_tp": DATA}[layout]
    tp = MODEL if layout in ("tp", "fsdp_tp") else None
    return {
        "column": P(fsdp, tp),          # [hidden, out]: hidden over fsdp, columns over tp
        "row": P(tp, fsdp),             # [in, hidden]: rows over tp, hidden over fsdp
        "embed": P(None, fsdp),         # [vocab, hidden]: hidden over fsdp
        "head": P(fsdp, None),          # [hidden, out]
    }[role]


def batch_spec(layout: str) -> P:
    """Where the batch's leading axis lives: every device for ``dp``/``fsdp``, ``"data"``
    otherwise (tensor parallelism replicates the batch over ``"model"``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    return P(ALL) if layout in ("dp", "fsdp") else P(DATA)


def _role(model: str, path: str) -> str | None:
    if model not in ROLES:
        raise ValueError(f"no sharding rules for model {model!r}; choose from {sorted(ROLES)}")
    return next((role for pat, role in ROLES[model] if paths_lib.fullmatch(pat, path)), None)


def param_shardings(params: Any, mesh: Mesh, model: str, layout: str) -> Any:
    """``NamedSharding`` per leaf of ``params`` (concrete or ``jax.ShapeDtypeStruct``) for
    ``model`` (``"llama"`` or ``"bert"``) under ``layout`` on ``mesh`` (axes ``"data"``,
    ``"model"``): :func:`matrix_spec` on a matrix's last two axes (leading stacked axes
    replicated), replicated for every other leaf. A mesh axis that does not divide its dimension
    is an error naming the leaf."""
    missing = [a for a in ALL if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"param_shardings: the mesh needs axes {ALL}; it has {mesh.axis_names}")

    def one(kp, x):
        path = paths_lib.path_str(paths_lib.to_path(kp))
        role = _role(model, path) if len(x.shape) >= 2 else None
        axes = () if role is None else (*(None,) * (len(x.shape) - 2), *matrix_spec(role, layout))
        while axes and axes[-1] is None:            # P(None, None) is written P()
            axes = axes[:-1]
        spec = P(*axes)
        for dim, axes in zip(x.shape, spec):
            size = 1
            for a in (axes if isinstance(axes, tuple) else (axes,)):
                size *= mesh.shape[a] if a is not None else 1
            if dim % size:
                raise ValueError(
                    f"param_shardings({model!r}, {layout!r}): {path} {tuple(x.shape)}: dimension "
                    f"{dim} is not divisible by mesh axes {axes} of size {size}; use a mesh whose "
                    f"axes divide the model's sizes, or another layout")
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, params)


def batch_shardings(batch: Any, mesh: Mesh, layout: str) -> Any:
    """``NamedSharding`` per leaf of ``batch``: its leading (example) axis by
    :func:`batch_spec`, the rest replicated."""
    spec = batch_spec(layout)
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, spec), batch)


def meshes(devices: Sequence[Any] | None = None) -> dict[str, Mesh]:
    """The ``("data", "model")`` meshes of the given devices (all by default) in every shape
    ``d x m`` with ``d * m`` equal to their number, keyed ``"dxm"``."""
    import numpy as np
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    return {f"{d}x{n // d}": Mesh(np.array(devices).reshape(d, n // d), ALL)
            for d in range(1, n + 1) if n % d == 0}
