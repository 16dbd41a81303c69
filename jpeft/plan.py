"""A planner: size a sharded fine-tuning run by compiling its train step here, without weights.

``plan(model="llama-3-8b", method="lora", mesh="fsdp=16,tp=4", batch=256, seq=4096)`` builds the
model from its config with ``jax.ShapeDtypeStruct`` parameters (``nnx.eval_shape``: nothing is
allocated), probes it, initialises the method's delta and the optimizer state abstractly
(``jax.eval_shape``), shards the base by :func:`param_shardings` (the delta and the optimizer state
follow it: :func:`jpeft.delta_shardings`, :func:`jpeft.opt_state_shardings`), then lowers and
compiles :func:`jpeft.make_train_step` for the mesh and reads XLA's ``memory_analysis()`` and
``cost_analysis()`` of the compiled, SPMD-partitioned program. That program is the one every
device runs, so its numbers are **per device**.

Per-device bytes (``d`` devices, a leaf of shape ``s`` sharded to the shard shape ``s'``:
``prod(s') * itemsize`` bytes on each device)::

    base   = sum over base leaves  prod(shard shape) * itemsize       (frozen weights)
    delta  = the same over the delta's leaves                         (trainable)
    opt    = the same over the optimizer state's leaves               (AdamW: 2 x delta + 4)
    batch  = the same over the batch (ids [B, T] int32, batch axis over dp x fsdp)
    arguments (XLA) = base + delta + opt + batch [+ key]              (checked: ``args_match``;
                      jit drops the key when nothing uses it, e.g. LoRA without dropout)
    temporaries     = XLA's temp_size: activations kept for the backward pass, gradients,
                      all-gathered weight shards, logits, optimizer update scratch
    peak   = max(arguments, base + delta + opt + batch) + outputs - aliased + temporaries

(jit drops an argument the step never reads: the key when nothing random runs, the whole base
under full fine-tuning, whose delta replaces every leaf; the caller still holds that base, so the
peak counts it.)

The outputs (new delta, new optimizer state, metrics) alias the donated delta and optimizer-state
buffers, so only the non-aliased outputs (the metrics, a few bytes) add to the arguments. ``fits``
is ``peak <= device_memory``. The figures come from the backend that compiled the step (on a CPU,
XLA:CPU's buffer assignment and fusion, whose temporaries differ from a GPU's or TPU's, typically
upwards since CPU does no memory-driven rematerialisation): a sizing estimate, not a promise.

FLOPs per step, two counts. ``flops_per_device``: ``cost_analysis()["flops"]`` of the per-device
program (every op, a dot as ``2 * M * N * K``), ``flops_total = devices * flops_per_device``; but
XLA counts a ``while`` loop's body **once**, so with scanned layers this is about the cost of the
non-layer part plus one layer (checked on LLaMA-3-8B: 1/8.5 of the matmul count).
``matmul_flops_total``: the matrix products of the step's jaxpr (:func:`dot_flops`: global shapes,
a ``scan`` body times its length, remat's recomputation included), the number to size a run by;
per device it is ``matmul_flops_total / devices`` under even partitioning. For orientation: a dense decoder with ``N`` matrix parameters costs about
``2 N`` FLOPs per token forward, ``6 N`` forward and backward with weight gradients (full
fine-tuning), ``4 N`` without them (LoRA: only input gradients flow through the frozen weights),
plus attention (``4 T H`` per token and layer forward).

Sharding (:func:`param_shardings`: :mod:`jpeft.models.sharding_rules` under :data:`LAYOUT`,
scanned layers ``[L, in, out]``): the mesh has axes ``("dp", "fsdp", "tp")`` (missing ones of
size 1). FSDP shards every weight matrix along its hidden axis over ``fsdp``; tensor parallelism
shards ``q/k/v/gate/up`` column-wise (output axis over ``tp``) and ``o/down`` row-wise (input
axis over ``tp``): ``q: P(None, "fsdp", "tp")``, ``o: P(None, "tp", "fsdp")``; the embedding
``[V, H]`` is ``P(None, "fsdp")``, the head ``[H, V]`` ``P("fsdp")`` (vocabularies need not
divide the mesh); norms are replicated. An NF4/int8 weight (QLoRA) stores its codes and block
scales in the weight's own layout (``[L, in, ceil(out / 2)]`` codes, ``[L, in, out / 64]`` scales)
and shards them with the weight's spec (:func:`jpeft.ops.quantize.stored_specs`: the last axis
replicated where its shards would cut a block), so each device dequantizes its own shard. The
batch's first axis is sharded over ``dp x fsdp``.

Remat (``"none" | "dots" | "full"``): the layers run under ``nnx.scan``; with ``"dots"`` or
``"full"`` the scanned layer body is wrapped in ``nnx.remat`` with
``jax.checkpoint_policies.dots_with_no_batch_dims_saveable`` (keep the projections' outputs,
recompute the rest: norms, activations, attention scores and probabilities) or
``nothing_saveable`` (keep only each layer's input): the model's own ``LlamaConfig.remat``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from jpeft.models import sharding_rules
from jpeft.models.llama import REMAT_POLICIES, LlamaConfig, LlamaForCausalLM

#: Named configs: the public Hugging Face ``config.json`` numbers of Meta's LLaMA 3 models, and a
#: tiny one for tests (``LlamaConfig.tiny``).
MODELS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
}
METHODS = ("lora", "full", "qlora")
REMAT = tuple(REMAT_POLICIES)
MESH_AXES = ("dp", "fsdp", "tp")
DTYPES = ("bfloat16", "float32")
#: ``--device-memory`` shorthands (decimal GB: 16 GB = 16e9 bytes; ``GiB`` is 2^30).
DEVICE_MEMORY = ("16GB", "32GB", "80GB", "141GB")
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class PlanError(ValueError):
    """A planner argument is wrong; ``flag`` names the command-line flag (``"--mesh"``)."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


class Plan(NamedTuple):
    """What :func:`plan` found. Bytes are per device; ``peak_bytes = max(argument_bytes,
    base + delta + opt + batch) + output_bytes - alias_bytes + temp_bytes``; ``args_match``:
    whether XLA's argument size equals ``base + delta + opt + batch`` bytes (plus the key's 8 when
    the step uses it; less the base when the step never reads it): the split into parts is exact
    then."""
    model: str
    method: str
    mesh: Mapping[str, int]
    devices: int
    batch: int
    seq: int
    remat: str
    base_params: int
    trainable: int
    base_bytes: int
    delta_bytes: int
    opt_bytes: int
    batch_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    peak_bytes: int
    args_match: bool
    flops_per_device: float
    flops_total: float
    matmul_flops_total: float
    device_memory: int | None
    fits: bool | None
    compile_seconds: float


# --------------------------------------------------------------------------- parsing


def parse_mesh(spec: str) -> dict[str, int]:
    """``"fsdp=16,tp=4"`` -> ``{"dp": 1, "fsdp": 16, "tp": 4}`` (axes of :data:`MESH_AXES`, each
    at most once, sizes >= 1; missing axes have size 1).

    Raises:
      PlanError: (``--mesh``) an unknown axis, a repeated one, or a size that is not a positive
        integer.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen = set()
    for item in str(spec).split(","):
        name, eq, value = item.strip().partition("=")
        name = name.strip()
        if not eq or name not in MESH_AXES:
            raise PlanError("--mesh", f"expected AXIS=SIZE[,AXIS=SIZE...] with AXIS in "
                                      f"{'/'.join(MESH_AXES)} (e.g. fsdp=16,tp=4), got {spec!r}")
        if name in seen:
            raise PlanError("--mesh", f"axis {name!r} given twice in {spec!r}")
        if not value.strip().isdigit() or int(value) < 1:
            raise PlanError("--mesh", f"size of {name!r} must be a positive integer, got "
                                      f"{value.strip()!r}")
        seen.add(name)
        sizes[name] = int(value)
    return sizes


def mesh_size(sizes: Mapping[str, int]) -> int:
    """The number of devices: the product of the axis sizes."""
    return int(math.prod(sizes.values()))


def parse_bytes(text: str | int | None) -> int | None:
    """``"80GB"`` -> ``80 * 10**9``; units B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB
    (powers of 1024); a bare number is bytes; ``None`` stays ``None``.

    Raises:
      PlanError: (``--device-memory``) anything else.
    """
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise PlanError("--device-memory", f"expected a size such as {', '.join(DEVICE_MEMORY)} "
                                           f"(or 24GiB), got {text!r}")
    unit = (m.group(2) or "B").upper()
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** power)


def model_config(model: str) -> LlamaConfig:
    """The scanned-layer :class:`LlamaConfig` of a name in :data:`MODELS` or of a Hugging Face
    ``config.json`` (a file, or a directory holding one).

    Raises:
      PlanError: (``--model``) neither a known name nor a readable config.
    """
    if model in MODELS:
        return LlamaConfig(**MODELS[model], scan_layers=True)
    path = model
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise PlanError("--model", f"unknown model {model!r}: one of {', '.join(MODELS)}, or a "
                                   f"path to a Hugging Face config.json")
    try:
        return LlamaConfig.from_json_file(path, scan_layers=True)
    except (ValueError, TypeError, OSError) as e:
        raise PlanError("--model", f"cannot read {path} as a LLaMA config: {e}") from None


def check(model: str, method: str, mesh: str, batch: int, seq: int, remat: str,
          device_memory: str | int | None = None, dtype: str = "bfloat16", rank: int = 16
          ) -> tuple[LlamaConfig, dict[str, int], int | None]:
    """Validate the arguments before anything is built: ``(config, mesh sizes, memory bytes)``.

    Raises:
      PlanError: naming the flag of the first bad argument (``--model``, ``--method``,
        ``--mesh``, ``--batch``, ``--seq``, ``--remat``, ``--device-memory``, ``--dtype``,
        ``--rank``), including a batch not divisible by ``dp * fsdp`` and a sequence longer than
        the model's positions.
    """
    config = model_config(model)
    if method not in METHODS:
        raise PlanError("--method", f"unknown method {method!r}; one of {', '.join(METHODS)}")
    sizes = parse_mesh(mesh)
    if remat not in REMAT:
        raise PlanError("--remat", f"one of {', '.join(REMAT)}, got {remat!r}")
    if dtype not in DTYPES:
        raise PlanError("--dtype", f"one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(rank, int) or rank < 1:
        raise PlanError("--rank", f"must be a positive integer, got {rank!r}")
    data = sizes["dp"] * sizes["fsdp"]
    if not isinstance(batch, int) or batch < 1 or batch % data:
        raise PlanError("--batch", f"must be a positive multiple of dp * fsdp = {data} (the batch "
                                   f"axis is sharded over both), got {batch!r}")
    if not isinstance(seq, int) or not 2 <= seq <= config.max_position_embeddings:
        raise PlanError("--seq", f"must be in [2, {config.max_position_embeddings}] (the model's "
                                 f"positions), got {seq!r}")
    return config, sizes, parse_bytes(device_memory)


# --------------------------------------------------------------------------- the model


def abstract_model(config: LlamaConfig, *, dtype: Any = jnp.bfloat16, remat: str = "none"):
    """``(apply, params)`` of :class:`LlamaForCausalLM` with ``jax.ShapeDtypeStruct`` parameters
    (``nnx.eval_shape``: no weight is allocated), each layer under ``remat``
    (``LlamaConfig.remat``)."""
    config = dataclasses.replace(config, remat=remat)
    from jpeft import nnx as jnnx
    return jnnx.split(nnx.eval_shape(
        lambda: LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype)))


def llama_param_count(config: LlamaConfig) -> int:
    """Closed form of the parameter count: ``V H (1 + untied) + H + L (H (N D) + 2 H (K D) +
    (N D) H + 3 H I + 2 H)`` (embedding [+ head], final norm; per layer q, k, v, o, gate, up,
    down and two norms; LLaMA has no biases unless configured)."""
    c = config
    nd, kd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = 2 * c.hidden_size * nd + 2 * c.hidden_size * kd + 3 * c.hidden_size * c.intermediate_size
    layer += 2 * c.hidden_size
    if c.attention_bias:
        layer += 2 * nd + 2 * kd
    if c.mlp_bias:
        layer += 2 * c.intermediate_size + c.hidden_size
    head = 1 if c.tie_word_embeddings else 2
    return c.vocab_size * c.hidden_size * head + c.hidden_size + c.num_hidden_layers * layer


def linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of the seven linear maps of a LLaMA layer."""
    c = config
    nd, kd, h, i = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim,
                    c.hidden_size, c.intermediate_size)
    return {"q_proj": (h, nd), "k_proj": (h, kd), "v_proj": (h, kd), "o_proj": (nd, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def lora_param_count(config: LlamaConfig, rank: int, targets: Any = "all-linear") -> int:
    """Closed form of LoRA's trainable count: ``L * sum r (in + out)`` over the adapted linear
    maps (``"all-linear"``: all seven of a layer; the output head is never adapted)."""
    names = LINEAR if targets == "all-linear" else [
        n for n in LINEAR if any(t.split("/")[-1] == n for t in _as_tuple(targets))]
    shapes = linear_shapes(config)
    return config.num_hidden_layers * sum(rank * sum(shapes[n]) for n in names)


def _as_tuple(targets: Any) -> tuple:
    return (targets,) if isinstance(targets, str) else tuple(targets)


# --------------------------------------------------------------------------- sharding


def make_mesh(sizes: Mapping[str, int]) -> Mesh:
    """A ``("dp", "fsdp", "tp")`` mesh over the first ``prod(sizes)`` devices.

    Raises:
      PlanError: (``--mesh``) this process has fewer devices.
    """
    n, have = mesh_size(sizes), jax.device_count()
    if have < n:
        raise PlanError("--mesh", f"the mesh needs {n} devices, this process has {have} (start "
                                  f"it with XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                                  f"JAX_PLATFORMS=cpu; `jpeft plan` does so itself)")
    devices = np.array(jax.devices()[:n]).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(devices, MESH_AXES)


#: The planner's layout on its ``("dp", "fsdp", "tp")`` mesh (:mod:`jpeft.models.sharding_rules`).
LAYOUT = sharding_rules.Layout(fsdp="fsdp", tp="tp", batch=("dp", "fsdp"))


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` of every base leaf: :func:`jpeft.models.sharding_rules.param_shardings`
    of the LLaMA under :data:`LAYOUT` (a quantized weight's stored arrays laid out like the
    weight: :func:`jpeft.ops.quantize.stored_specs`).

    Raises:
      PlanError: (``--mesh``) a weight axis not divisible by its mesh axes.
    """
    try:
        return sharding_rules.param_shardings(params, mesh, "llama", LAYOUT)
    except ValueError as e:
        raise PlanError("--mesh", str(e)) from None


def bytes_per_device(tree: Any, shardings: Any) -> int:
    """``sum prod(sharding.shard_shape(shape)) * itemsize`` over the leaves of ``tree``: the
    bytes each device holds (every device holds the same under a ``NamedSharding`` whose axes
    divide the shape)."""
    leaves = jax.tree_util.tree_leaves(tree)
    shards = jax.tree_util.tree_leaves(shardings)
    if len(leaves) != len(shards):
        raise ValueError(f"bytes_per_device: {len(leaves)} leaves, {len(shards)} shardings")
    return int(sum(math.prod(s.shard_shape(tuple(x.shape))) * np.dtype(x.dtype).itemsize
                   for x, s in zip(leaves, shards)))


# --------------------------------------------------------------------------- the method


def build_method(method: str, targets: Any = "all-linear", rank: int = 16,
                 alpha: float | None = None):
    """``lora``/``qlora``: :func:`jpeft.lora` (``alpha`` default ``2 * rank``); ``full``:
    :func:`jpeft.full_finetune` of every leaf."""
    import jpeft
    if method == "full":
        return jpeft.full_finetune()
    return jpeft.lora(targets, rank=rank, alpha=2.0 * rank if alpha is None else alpha)


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy: ``logits [B, T, V]`` at ``t`` scored against ``ids[t+1]``
    (float32)."""
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:])
    return nll.mean()


# --------------------------------------------------------------------------- the plan


def plan(model: str = "tiny", method: str = "lora", *, mesh: str = "fsdp=8", batch: int = 8,
         seq: int = 16, remat: str = "none", targets: Any = "all-linear", rank: int = 16,
         alpha: float | None = None, device_memory: str | int | None = None,
         dtype: str = "bfloat16", learning_rate: float = 1e-4) -> Plan:
    """Compile one AdamW train step of ``method`` on ``model`` for ``mesh`` and report its
    per-device memory and FLOPs (module docstring). Needs at least ``prod(mesh)`` devices (the
    first ones are used): host devices via ``XLA_FLAGS=--xla_force_host_platform_device_count``.

    ``dtype``: the base weights' and the computation's dtype (LoRA factors are float32 by the
    mixed-precision policy; a full fine-tuning delta has the base's dtype). ``qlora``: the base's
    linear weights stored NF4 (:func:`jpeft.quantize_params`, double quantization), LoRA on top.

    Raises:
      PlanError: a bad argument (:func:`check`), too few devices or an indivisible weight
        (``--mesh``).
    """
    config, sizes, memory = check(model, method, mesh, batch, seq, remat, device_memory, dtype,
                                  rank)
    the_mesh = make_mesh(sizes)
    # Traced (probe, lowering) with the activations' batch axis pinned: XLA then gathers the
    # FSDP-sharded weights per layer rather than the activations (sharding_rules.constrain).
    with sharding_rules.activation_sharding(the_mesh, LAYOUT):
        return _plan_on(the_mesh, config, model, method, sizes, memory, targets, rank, alpha,
                        batch, seq, remat, dtype, learning_rate)


def _plan_on(the_mesh, config, model, method, sizes, memory, targets, rank, alpha, batch, seq,
             remat, dtype, learning_rate) -> Plan:
    import jpeft
    dt = jnp.dtype(dtype)
    apply, params = abstract_model(config, dtype=dt, remat=remat)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    sites = jpeft.probe(apply, params, ids)
    full_params = params
    if method == "qlora":
        params = jax.eval_shape(lambda p: jpeft.quantize_params(p, sites, scheme="nf4"), params)
        # each dequantized weight is pinned to its full-precision layout (the stored arrays
        # share it, so this costs nothing where they shard; where a last axis is replicated it
        # keeps the dequantized copy sharded); the model's own remat
        # decides what the backward keeps (dequantizing's outer "dots" remat around a model
        # that rematerialises its layers itself keeps every product, the attention's included)
        apply = jpeft.dequantizing(apply, remat=None,
                                   shardings=param_shardings(full_params, the_mesh))
        sites = jpeft.probe(apply, params, ids)
    m = build_method(method, targets, rank, alpha)
    delta = jax.eval_shape(lambda k, p: m.init(k, p, sites), jax.random.key(0), params)
    optimizer = optax.adamw(learning_rate)
    opt_state = jax.eval_shape(optimizer.init, delta)

    p_sh = param_shardings(params, the_mesh)
    # The delta follows each weight's logical layout: the factors take the shardings of the
    # full-precision weight (a quantized weight's shardings are a tree of its stored arrays).
    d_sh = jpeft.delta_shardings(m, param_shardings(full_params, the_mesh), delta, sites)
    o_sh = jpeft.opt_state_shardings(optimizer, delta, d_sh, the_mesh)
    b_sh = sharding_rules.batch_shardings({"ids": ids}, the_mesh, LAYOUT)
    f = jpeft.wrap(apply, m, sites)
    step = jpeft.make_train_step(lambda p, d, b, k: lm_loss(f(p, d, b["ids"]), b["ids"]),
                                 optimizer, method=m, param_shardings=p_sh, delta_shardings=d_sh,
                                 opt_state_shardings=o_sh, batch_shardings=b_sh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    t0 = time.perf_counter()
    compiled = step.lower(params, delta, opt_state, {"ids": ids}, key).compile()
    seconds = time.perf_counter() - t0

    matmul = dot_flops(jax.make_jaxpr(step.nested)(params, delta, opt_state, {"ids": ids}, key))
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    base_b = bytes_per_device(params, p_sh)
    delta_b = bytes_per_device(delta, d_sh)
    opt_b = bytes_per_device(opt_state, o_sh)
    batch_b = bytes_per_device({"ids": ids}, b_sh)
    key_b = np.dtype(jax.random.key_data(jax.random.key(0)).dtype).itemsize * 2
    args, out, alias, temp = (int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                              int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes))
    resident = base_b + delta_b + opt_b + batch_b
    # jit drops arguments the step never reads: the key (LoRA without dropout), or the whole base
    # under full fine-tuning (every leaf replaced by the delta); the caller still holds the base.
    unused = 0 if args - resident in (0, key_b) else base_b
    peak = max(args, resident) + out - alias + temp
    from jpeft.core import tree as tree_lib
    return Plan(model=model, method=method, mesh=sizes, devices=mesh_size(sizes), batch=batch,
                seq=seq, remat=remat, base_params=tree_lib.num_params(params),
                trainable=tree_lib.trainable_count(delta, m), base_bytes=base_b,
                delta_bytes=delta_b, opt_bytes=opt_b, batch_bytes=batch_b,
                argument_bytes=args, output_bytes=out, alias_bytes=alias, temp_bytes=temp,
                peak_bytes=peak,
                args_match=args - (resident - unused) in (0, key_b),
                flops_per_device=flops, flops_total=flops * mesh_size(sizes),
                matmul_flops_total=matmul,
                device_memory=memory, fits=fits(peak, memory),
                compile_seconds=seconds)


def fits(peak: int, memory: int | None) -> bool | None:
    """``peak <= memory`` (``None`` without a memory to compare with). No headroom is taken
    off: leave some for the runtime, fragmentation and XLA's scratch on the real device."""
    return None if memory is None else peak <= memory


def with_memory(p: Plan, device_memory: str | int | None) -> Plan:
    """``p`` checked against another per-device memory (no recompilation)."""
    memory = parse_bytes(device_memory)
    return p._replace(device_memory=memory, fits=fits(p.peak_bytes, memory))


def dot_flops(jaxpr: Any) -> float:
    """FLOPs of the matrix products of a (closed) jaxpr, global shapes: ``2 * prod(out) *
    prod(contracted)`` per ``dot_general``; a ``scan``'s body counts ``length`` times, a ``cond``
    its costliest branch, any other sub-program once (a ``while`` of unknown trip count once)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
            continue
        subs = []
        for v in eqn.params.values():
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                if hasattr(x, "eqns") or hasattr(getattr(x, "jaxpr", None), "eqns"):
                    subs.append(dot_flops(x))
        if not subs:
            continue
        if eqn.primitive.name == "cond":
            total += max(subs)
        else:
            total += sum(subs) * (eqn.params.get("length", 1) if eqn.primitive.name == "scan"
                                  else 1)
    return total


def human_bytes(n: float) -> str:
    """``n`` bytes in GiB/MiB/KiB/B (powers of 1024), three significant digits."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def format_plan(p: Plan) -> str:
    """The plan as a table (bytes per device)."""
    mesh = ",".join(f"{a}={s}" for a, s in p.mesh.items() if s > 1) or "dp=1"
    rows = [
        ("base (frozen weights)", p.base_bytes),
        ("delta (trainable)", p.delta_bytes),
        ("optimizer state", p.opt_bytes),
        ("batch", p.batch_bytes),
        ("temporaries (XLA temp)", p.temp_bytes),
        ("outputs not aliased", p.output_bytes - p.alias_bytes),
        ("peak", p.peak_bytes),
    ]
    lines = [f"plan: {p.model}, {p.method}, mesh {mesh} ({p.devices} devices), batch {p.batch} x "
             f"seq {p.seq}, remat {p.remat}",
             f"parameters: {p.base_params:,} base, {p.trainable:,} trainable "
             f"({100.0 * p.trainable / max(p.base_params, 1):.3g}%)",
             f"{'per device':<26}{'bytes':>18}{'':>3}{'':<10}"]
    lines += [f"  {name:<24}{n:>18,}   {human_bytes(n)}" for name, n in rows]
    lines.append(f"XLA: arguments {p.argument_bytes:,}, outputs {p.output_bytes:,} (aliased "
                 f"{p.alias_bytes:,}), temp {p.temp_bytes:,}; arguments = base + delta + "
                 f"optimizer + batch + key: {'yes' if p.args_match else 'no'}")
    lines.append(f"FLOPs per step, matrix products (jaxpr, scan x layers): "
                 f"{p.matmul_flops_total:.4g} in all, {p.matmul_flops_total / p.devices:.4g} per "
                 f"device")
    lines.append(f"FLOPs per step, XLA cost analysis (a scan body counted once): "
                 f"{p.flops_per_device:.4g} per device, {p.flops_total:.4g} in all")
    if p.device_memory is not None:
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"device memory {human_bytes(p.device_memory)} ({p.device_memory:,} bytes): "
                     f"{verdict} (peak {100.0 * p.peak_bytes / p.device_memory:.1f}%)")
    lines.append(f"compiled in {p.compile_seconds:.1f} s on {jax.devices()[0].platform}")
    return "\n".join(lines)


__all__ = ["DEVICE_MEMORY", "METHODS", "MODELS", "MESH_AXES", "Plan", "PlanError", "REMAT",
           "abstract_model", "bytes_per_device", "check", "fits", "format_plan", "human_bytes",
           "linear_shapes", "llama_param_count", "lora_param_count", "make_mesh", "model_config",
           "param_shardings", "parse_bytes", "parse_mesh", "plan", "with_memory"]
