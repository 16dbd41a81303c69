"""Load Hugging Face LLaMA safetensors straight into a device mesh, one device slice at a time.

:func:`load_hf_llama_sharded` is :func:`jpeft.models.llama.load_hf_llama` for checkpoints that do
not fit (or should not be copied whole) in host memory: every parameter is placed with the
sharding asked for, and each device's block is read from the file on its own, with safetensors'
lazy slicing (``safe_open(path, framework="numpy").get_slice(key)[rows, cols]``). No tensor of
the model is ever materialised whole on the host unless its sharding replicates it.

Layouts. The file holds Hugging Face tensors (``weight [out, in]`` for a linear map); jpeft stores
``kernel = weight.T`` (``[in, out]``), and a scanned model stacks the layers on a leading axis
(``[L, in, out]``). A device's block ``kernel[i0:i1, o0:o1]`` (of layers ``l0:l1`` when scanned) is
read in the file's own layout, ``weight[o0:o1, i0:i1]`` of ``model.layers.{l}.*``, and transposed
on the host.

Host memory. safetensors maps the file: the pages a slice touches count in the process's
resident memory while the file is open, and a column slice of a row-major tensor touches every
row in its range. So each read opens the file for a band of at most ``chunk_bytes`` of *whole file
rows*, copies its part into the device's host block and closes it again; each device's block is
handed to that device (``jax.device_put``) and dropped before the next one is read, and devices
sharing a block (replicas) share one read. Beyond the loaded arrays themselves, the host holds at
most one device block (a replicated tensor: the whole tensor) plus one band (``chunk_bytes``,
64 MiB by default) at a time. (``jax.make_array_from_callback`` would read the same blocks but
keeps all of a parameter's host blocks alive until it has copied them to the devices: one whole
tensor more.)

Shapes: ``H`` hidden size, ``I`` intermediate size, ``V`` vocabulary, ``L`` layers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, Sharding

from jpeft.core.sharding import axis_size
from jpeft.models.llama import (IGNORED_HF_SUFFIXES, TIED_HEAD_DIFFERS, LlamaConfig,
                                LlamaForCausalLM, _hf_targets, _param_variables, _Target)

Dtype = Any
Ranges = tuple[tuple[int, int], ...]
"""A block of an array: ``(start, stop)`` per dimension."""

ShardingSpec = (Sharding | Callable[[str, tuple[int, ...]], Sharding]
                | Mapping[str, Sharding])
"""One sharding for every parameter, a function ``(path, shape) -> Sharding`` of the
``'/'``-joined NNX parameter path (``"model/layers/0/mlp/up_proj/kernel"``) and its jpeft shape
(``[in, out]`` kernels; ``[L, ...]`` in a scanned stack), or ``{path: Sharding}`` for every
parameter (e.g. a flattened tree of :func:`jpeft.shard_by_rules`)."""

CHUNK_BYTES = 64 << 20
"""Default size of one band of file rows read while the file is open (see the module doc)."""

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
"""safetensors dtype names -> numpy dtypes (``bfloat16`` from ``ml_dtypes``)."""


# --------------------------------------------------------------------------- checkpoint files


class TensorInfo(NamedTuple):
    """Where one tensor of a checkpoint lives: its file, its shape and dtype (from the header
    only: nothing is read)."""

    file: pathlib.Path
    shape: tuple[int, ...]
    dtype: np.dtype


def checkpoint_files(path: str | os.PathLike) -> tuple[list[pathlib.Path], dict[str, str] | None]:
    """The ``.safetensors`` files of a checkpoint and, for the sharded form, its ``weight_map``.

    ``path`` is a ``.safetensors`` file, a ``model.safetensors.index.json``, or a directory with
    ``model.safetensors`` or ``model.safetensors.index.json`` (the single file wins).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return [path / "model.safetensors"], None
        path = path / "model.safetensors.index.json"
        if not path.is_file():
            raise FileNotFoundError(f"no model.safetensors(.index.json) in {path.parent}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if not path.name.endswith(".json"):
        return [path], None
    with open(path, encoding="utf-8") as f:
        weight_map = dict(json.load(f)["weight_map"])
    return [path.parent / n for n in sorted(set(weight_map.values()))], weight_map


def _header(file: pathlib.Path) -> dict[str, TensorInfo]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(file), framework="numpy") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            name = sl.get_dtype()
            if name not in SAFETENSORS_DTYPES:
                raise ValueError(f"{key!r} in {file} has dtype {name}, which numpy cannot hold; "
                                 f"supported: {sorted(SAFETENSORS_DTYPES)}")
            out[key] = TensorInfo(file, tuple(sl.get_shape()), SAFETENSORS_DTYPES[name])
    return out


def tensor_index(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """``{key: TensorInfo}`` of every tensor of a checkpoint (see :func:`checkpoint_files`), read
    from the files' headers. A ``weight_map`` entry whose file lacks the tensor raises a
    ``ValueError`` naming both."""
    files, weight_map = checkpoint_files(path)
    index: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} (listed in the index's weight_map) does not exist: "
                                    "the checkpoint is incomplete; download the missing shard")
        index.update(_header(file))
    for key, name in (weight_map or {}).items():
        info = index.get(key)
        if info is None or info.file.name != name:
            raise ValueError(f"the index maps {key!r} to {name}, but that file has no such tensor"
                             + ("" if info is None else f" (it is in {info.file.name})")
                             + ": the index is stale or the shard incomplete; re-download it")
    return index


# --------------------------------------------------------------------------- reading blocks


def _ranges(index: tuple[slice, ...], shape: Sequence[int]) -> Ranges:
    """A device's block, ``sharding.devices_indices_map`` style (slices, maybe ``None`` ends),
    as ``(start, stop)`` per dimension of ``shape``."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for sl, n in zip(index, shape):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided device blocks are not supported: {index}")
        out.append((start, stop))
    return tuple(out)


def _bands(ranges: Ranges, file_shape: Sequence[int], itemsize: int,
           chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Bands ``(r0, r1)`` of the block's rows (its dimension 0 in the file) such that the
    *whole* file rows of a band take at most ``chunk_bytes`` (at least one row per band)."""
    row_bytes = math.prod(file_shape[1:]) * itemsize
    step = max(1, chunk_bytes // max(row_bytes, 1))
    r0, r1 = ranges[0] if ranges else (0, 1)
    for start in range(r0, r1, step):
        yield start, min(start + step, r1)


def read_block(info: TensorInfo, key: str, ranges: Ranges, out: np.ndarray, *,
               transpose: bool = False, chunk_bytes: int = CHUNK_BYTES) -> np.ndarray:
    """Fill ``out`` with the block ``ranges`` of tensor ``key`` (in jpeft's layout) and return it.

    With ``transpose`` (a 2-D linear weight: the file holds ``weight [out, in]``, ``out`` is a
    block of ``kernel = weight.T``), ``ranges = ((i0, i1), (o0, o1))`` is read as
    ``weight[o0:o1, i0:i1]`` and transposed. The file is opened once per band of file rows
    (:func:`_bands`) and closed after it, so at most ``chunk_bytes`` of it are mapped at a time.
    Values are cast to ``out.dtype``.
    """
    from safetensors import safe_open

    file_ranges = ranges[::-1] if transpose else ranges
    if not file_ranges:                                      # a scalar
        with safe_open(str(info.file), framework="numpy") as f:
            out[...] = f.get_tensor(key)
        return out
    rest = tuple(slice(a, b) for a, b in file_ranges[1:])
    r0 = file_ranges[0][0]
    for b0, b1 in _bands(file_ranges, info.shape, info.dtype.itemsize, chunk_bytes):
        with safe_open(str(info.file), framework="numpy") as f:
            band = f.get_slice(key)[(slice(b0, b1),) + rest]
        if transpose:
            out[:, b0 - r0:b1 - r0] = band.T
        else:
            out[b0 - r0:b1 - r0] = band
        del band
    return out


# --------------------------------------------------------------------------- shardings


def check_sharding(path: str, hf_key: str, shape: tuple[int, ...], sharding: Sharding) -> None:
    """Raise a ``ValueError`` naming the parameter, its Hugging Face key and the way out when
    ``sharding`` cannot place an array of ``shape`` in equal blocks (a spec longer than the
    rank, or mesh axes whose size does not divide a dimension)."""
    where = f"parameter {path!r} (from {hf_key!r}, jpeft shape {shape})"
    if isinstance(sharding, NamedSharding):
        spec = sharding.spec
        if len(spec) > len(shape):
            raise ValueError(f"the sharding of {where} has spec {spec} with more entries than the "
                             "parameter has dimensions; give it a spec of at most "
                             f"{len(shape)} entries")
        for dim, (n, axis) in enumerate(zip(shape, spec)):
            size = axis_size(sharding.mesh, axis)
            if n % size:
                raise ValueError(f"the sharding of {where} splits dimension {dim} (size {n}) "
                                 f"over mesh axes {axis!r} of size {size}, which does not divide "
                                 f"it; replicate that dimension (None in its spec) or use mesh "
                                 f"axes whose size divides {n}")
        return
    try:
        block = sharding.shard_shape(shape)
        blocks = sharding.addressable_devices_indices_map(shape).values()
    except ValueError as e:
        raise ValueError(f"the sharding {sharding} cannot place {where}: {e}; choose one whose "
                         "device counts divide the dimensions") from None
    for index in blocks:
        if tuple(b - a for a, b in _ranges(index, shape)) != tuple(block):
            raise ValueError(f"the sharding {sharding} splits {where} into unequal blocks; choose "
                             "one whose device counts divide the dimensions")


# --------------------------------------------------------------------------- placing


def place(shape: tuple[int, ...], dtype: Dtype, sharding: Sharding,
          fill: Callable[[Ranges, np.ndarray], np.ndarray]) -> jax.Array:
    """A ``jax.Array`` of ``shape``/``dtype`` with ``sharding``, built block by block.

    ``fill(ranges, out)`` writes the block ``ranges`` of the array into the host buffer ``out``
    (``np.empty`` of the block's shape); it runs once per distinct block (devices holding the same
    block share it), and each block is copied to its devices and released before the next is read.
    """
    groups: dict[Ranges, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        groups.setdefault(_ranges(index, shape), []).append(device)
    placed = {}
    for ranges, devices in groups.items():
        host = fill(ranges, np.empty(tuple(b - a for a, b in ranges), dtype))
        for device in devices:
            placed[device] = jax.device_put(host, device)
        jax.block_until_ready([placed[d] for d in devices])
        del host
    arrays = [placed[d] for d in sharding.addressable_devices_indices_map(shape)]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _fill_param(index: Mapping[str, TensorInfo], keys: Mapping[int | None, str],
                target: _Target, chunk_bytes: int):
    """The ``fill`` of :func:`place` for one parameter: ``keys`` maps the layer (``None`` when
    not stacked) to its Hugging Face key; a stacked block's first range selects layers."""
    def fill(ranges: Ranges, out: np.ndarray) -> np.ndarray:
        if target.layer is None and None in keys:
            return read_block(index[keys[None]], keys[None], ranges, out,
                              transpose=target.transpose, chunk_bytes=chunk_bytes)
        (l0, l1), rest = ranges[0], ranges[1:]
        for layer in range(l0, l1):
            read_block(index[keys[layer]], keys[layer], rest, out[layer - l0],
                       transpose=target.transpose, chunk_bytes=chunk_bytes)
        return out
    return fill


def _same_tensor(index: Mapping[str, TensorInfo], a: str, b: str, chunk_bytes: int) -> bool:
    """Whether tensors ``a`` and ``b`` are equal, compared band by band."""
    ia, ib = index[a], index[b]
    if ia.shape != ib.shape:
        return False
    whole = tuple((0, n) for n in ia.shape)
    for r0, r1 in _bands(whole, ia.shape, ia.dtype.itemsize, chunk_bytes // 2):
        band = ((r0, r1),) + whole[1:]
        xa = read_block(ia, a, band, np.empty([r1 - r0, *ia.shape[1:]], ia.dtype))
        xb = read_block(ib, b, band, np.empty([r1 - r0, *ib.shape[1:]], ib.dtype))
        if not np.array_equal(xa, xb):
            return False
    return True


def _match(index: Mapping[str, TensorInfo], targets: Mapping[str, _Target],
           config: LlamaConfig, chunk_bytes: int) -> None:
    """Check the checkpoint's keys and shapes against the model's; raise naming the tensors."""
    unexpected = []
    for key, info in index.items():
        if key.endswith(IGNORED_HF_SUFFIXES):
            continue
        if key == "lm_head.weight" and key not in targets and config.tie_word_embeddings:
            embed = "model.embed_tokens.weight"
            if embed in index and not _same_tensor(index, key, embed, chunk_bytes):
                raise ValueError(TIED_HEAD_DIFFERS)
            continue
        target = targets.get(key)
        if target is None:
            unexpected.append(key)
        elif info.shape != target.hf_shape:
            raise ValueError(f"shape mismatch for {key!r} in {info.file.name}: the file has "
                             f"{info.shape}, the config expects {target.hf_shape}"
                             + (" ([out, in]; kernel = weight.T)" if target.transpose else "")
                             + "; pass the config.json that came with this checkpoint")
    missing = [k for k in targets if k not in index]
    if missing or unexpected:
        hint = ("; the config does not describe this checkpoint (compare num_hidden_layers, "
                "tie_word_embeddings, attention_bias, mlp_bias with its config.json)")
        if "lm_head.weight" in missing:
            hint += ("; a checkpoint without 'lm_head.weight' ties it to the embedding: "
                     "tie_word_embeddings=True")
        raise ValueError(f"cannot load the LLaMA checkpoint: tensors missing from the files "
                         f"{missing}, unexpected tensors {sorted(unexpected)}{hint}")


def _resolve_sharding(shardings: ShardingSpec, path: str, shape: tuple) -> Sharding:
    if isinstance(shardings, Mapping):
        if path not in shardings:
            raise ValueError(f"shardings has no entry for parameter {path!r} (jpeft shape "
                             f"{shape}); give every parameter a sharding, or pass a function "
                             "(path, shape) -> Sharding with a default")
        sharding = shardings[path]
    elif isinstance(shardings, Sharding):
        sharding = shardings
    else:
        sharding = shardings(path, shape)
    if not isinstance(sharding, Sharding):
        raise TypeError(f"shardings({path!r}, {shape}) returned {sharding!r}, not a "
                        "jax.sharding.Sharding")
    return sharding


def load_hf_llama_sharded(source: str | os.PathLike, config: LlamaConfig | None = None, *,
                          shardings: ShardingSpec, dtype: Dtype = jnp.float32,
                          param_dtype: Dtype | None = None, scan_layers: bool | None = None,
                          chunk_bytes: int = CHUNK_BYTES) -> LlamaForCausalLM:
    """A :class:`LlamaForCausalLM` whose parameters are read from safetensors onto their shardings.

    Args:
      source: a directory with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json``, one of those files, or any ``.safetensors`` file.
      config: the model's config; read from ``config.json`` next to ``source`` when ``None``.
      shardings: a ``jax.sharding.Sharding`` for every parameter, a function ``(path, shape)
        -> Sharding`` of the ``'/'``-joined parameter path and its jpeft shape (e.g.
        :func:`jpeft.models.sharding_rules.sharding_fn` for a named layout, or
        :func:`jpeft.core.sharding.rule_sharding` for regex rules), or ``{path: Sharding}``
        covering every parameter (see :data:`ShardingSpec`). Every device reads only its own block from the file.
      dtype: the computation dtype.
      param_dtype: cast every parameter to this dtype; ``None`` keeps each tensor's dtype in the
        file (bfloat16 stays bfloat16; a scanned stack takes the promoted dtype of its layers).
        The model's ``param_dtype`` attribute is then the embedding's dtype.
      scan_layers: overrides ``config.scan_layers``.
      chunk_bytes: at most this many bytes of whole file rows are mapped at a time.

    Keys, names and layouts are those of :func:`jpeft.models.llama.load_hf_llama`: ``weight
    [out, in] -> kernel [in, out]`` (a device's block is sliced in the file's layout, then
    transposed), ``model.layers.{i}.*`` stacked along a scanned stack's leading axis, rotary
    buffers ignored, a tied ``lm_head.weight`` checked (band by band) against the embedding.

    Raises:
      ValueError: naming the tensor and the way out, on a tensor missing from the files (or from
        the file its index names), an unexpected tensor, a shape that does not match the config,
        or a sharding that does not divide a dimension.
    """
    index = tensor_index(source)
    if config is None:
        root = pathlib.Path(source)
        root = root if root.is_dir() else root.parent
        if not (root / "config.json").is_file():
            raise ValueError(f"no config.json next to {source}; pass config=")
        config = LlamaConfig.from_json_file(root / "config.json")
    if scan_layers is not None:
        config = dataclasses.replace(config, scan_layers=scan_layers)
    embed = index.get("model.embed_tokens.weight")
    model_param_dtype = param_dtype or (embed.dtype if embed is not None else jnp.float32)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, dtype=dtype,
                                                    param_dtype=model_param_dtype))
    targets = _hf_targets(model)
    _match(index, targets, config, chunk_bytes)

    keys_of: dict[tuple, dict[int | None, str]] = {}
    for key, target in targets.items():
        keys_of.setdefault(target.path, {})[target.layer] = key
    plan = []                                   # every sharding is checked before any read
    for path, var in _param_variables(model):
        keys, name = keys_of[path], "/".join(map(str, path))
        first = next(iter(keys.values()))
        shape = tuple(var.shape)
        sharding = _resolve_sharding(shardings, name, shape)
        check_sharding(name, first, shape, sharding)
        dt = (np.dtype(param_dtype) if param_dtype is not None
              else np.result_type(*(index[k].dtype for k in keys.values())))
        plan.append((var, shape, dt, sharding, _fill_param(index, keys, targets[first],
                                                           chunk_bytes)))
    for var, shape, dt, sharding, fill in plan:
        var.set_value(place(shape, dt, sharding, fill))
    return model


__all__ = [
    "CHUNK_BYTES", "SAFETENSORS_DTYPES", "ShardingSpec", "TensorInfo", "check_sharding",
    "checkpoint_files", "load_hf_llama_sharded", "place", "read_block",
    "tensor_index",
]
