"""Multi-process (multi-host) input: each process feeds only its own rows of the global batch.

Under ``jax.distributed.initialize`` every process sees the global mesh but can only write to
its own (addressable) devices. A train step compiled with ``batch_shardings`` takes a *global*
batch: one ``jax.Array`` per leaf whose shape is the global batch's and whose shards lie on every
process's devices. Each process holds and loads only the rows its devices need:

    rows = jpeft.distributed.process_rows(mesh, P("data"), global_rows=64)   # e.g. slice(0, 32)
    local = {"ids": ids[rows], "mask": mask[rows]}                            # [32, T] here
    batch = jpeft.distributed.global_batch(local, mesh, P("data"))            # [64, T] global

The batch axis is the leading one; ``spec`` says which mesh axes shard it (``P("data")``,
``P(("data", "model"))``; ``P()``: every process holds every row). Trailing axes are not
sharded by these helpers (give them ``None`` or leave them out of ``spec``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _batch_sharding(mesh: Mesh, spec: PartitionSpec, name: str) -> NamedSharding:
    if any(axis is not None for axis in tuple(spec)[1:]):
        raise ValueError(f"{name}: spec {spec} shards an axis after the batch axis; only the "
                         f"leading (batch) axis may be sharded here")
    return NamedSharding(mesh, spec)


def process_rows(mesh: Mesh, spec: PartitionSpec, global_rows: int,
                 process_index: int | None = None) -> slice:
    """The rows ``[start, stop)`` of a global batch of ``global_rows`` rows that process
    ``process_index`` (default: this one) must hold for a batch sharded by ``NamedSharding(mesh,
    spec)`` on its leading axis.

    They are the union of the rows of the process's devices in ``mesh``: with the devices of
    process ``p`` forming block ``p`` of the sharded mesh axes (``jax.devices()`` order, as
    ``jax.make_mesh`` and ``Mesh(np.array(jax.devices()).reshape(...))`` lay them out), process
    ``p`` of ``P`` holds ``global_rows // P`` rows starting at ``p * global_rows // P``; a
    process whose devices hold every row (``spec`` replicates the batch over processes) holds
    all ``global_rows``.

    Raises:
      ValueError: ``global_rows`` not divisible by the number of batch shards; a process
        without devices in ``mesh``; or rows of a process that are not contiguous (a mesh whose
        devices interleave processes along the batch axes): reorder the mesh's devices.
    """
    name = "jpeft.distributed.process_rows"
    sharding = _batch_sharding(mesh, spec, name)
    process_index = jax.process_index() if process_index is None else process_index
    try:
        indices = sharding.devices_indices_map((global_rows,))
    except ValueError as e:
        raise ValueError(f"{name}: {global_rows} rows cannot be sharded by {spec} on mesh "
                         f"{dict(mesh.shape)}: {e}") from None
    spans = sorted({(idx[0].start or 0, global_rows if idx[0].stop is None else idx[0].stop)
                    for d, idx in indices.items() if d.process_index == process_index})
    if not spans:
        raise ValueError(f"{name}: process {process_index} has no device in the mesh")
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if start != stop:
            raise ValueError(
                f"{name}: the rows of process {process_index} are not contiguous "
                f"({', '.join(f'{a}:{b}' for a, b in spans)}): the mesh interleaves processes "
                f"along the batch axes {spec[0] if len(spec) else None}; lay out its devices so "
                f"that each process's devices are one block (jax.make_mesh does)")
    return slice(spans[0][0], spans[-1][1])


def global_batch(local_batch: Any, mesh: Mesh, spec: PartitionSpec) -> Any:
    """The global batch, one ``jax.Array`` per leaf, from this process's rows of it.

    Args:
      local_batch: a tree of host arrays ``[b, ...]``: rows :func:`process_rows` ``(mesh, spec,
        B)`` of the global batch, in order, where ``B = b * (processes sharing the batch)``
        (``b = B`` when ``spec`` replicates the batch over processes). Every process calls this
        with its own rows, the same tree structure, trailing shapes and dtypes.
      mesh: the global mesh (all processes' devices).
      spec: how the leading (batch) axis is sharded, e.g. ``P("data")`` or
        ``P(("data", "model"))``; the trailing axes are replicated.

    Returns:
      the same tree of global arrays ``[B, ...]`` sharded as ``NamedSharding(mesh, spec)``
      (``jax.make_array_from_process_local_data``): pass it to a train step compiled with that
      sharding as its ``batch_shardings``. In one process this is ``jax.device_put(local_batch,
      NamedSharding(mesh, spec))``.

    Raises:
      ValueError: a leaf whose rows do not divide among this process's devices, or a spec that
        shards a trailing axis.
    """
    sharding = _batch_sharding(mesh, spec, "jpeft.distributed.global_batch")

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"jpeft.distributed.global_batch: leaf "
                             f"{jax.tree_util.keystr(path)} is a scalar; every leaf needs a "
                             f"leading batch axis")
        try:
            return jax.make_array_from_process_local_data(sharding, x)
        except ValueError as e:
            raise ValueError(f"jpeft.distributed.global_batch: leaf "
                             f"{jax.tree_util.keystr(path)} {x.shape} does not fit {spec} on "
                             f"mesh {dict(mesh.shape)} (process {jax.process_index()} of "
                             f"{jax.process_count()}): {e}") from None
    return jax.tree_util.tree_map_with_path(one, local_batch)
