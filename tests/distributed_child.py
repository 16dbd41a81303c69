"""One of the 2 processes of tests/test_distributed.py: a LoRA train step and orbax checkpoints
on a 2 x 4 ``("data", "model")`` mesh of 8 CPU devices spread over 2 processes (4 each).

``python distributed_child.py PORT PROCESS_ID OUT_DIR`` (environment: ``XLA_FLAGS`` with
``--xla_force_host_platform_device_count=4``, ``JAX_PLATFORMS=cpu``):

1. joins the job (gloo CPU collectives, coordinator ``localhost:PORT``, 2 processes);
2. for each layout of :data:`LAYOUTS` trains the LoRA delta of a tiny LLaMA for :data:`STEPS`
   AdamW steps, each process feeding only its own rows of the global batch
   (:func:`jpeft.distributed.global_batch`), and writes ``OUT_DIR/<layout>.npz`` (process 0: the
   losses and the final delta, gathered);
3. for the layouts of :data:`SAVED` saves the trained delta and optimizer state from both
   processes, with :class:`jpeft.checkpoint.Manager` under ``OUT_DIR/manager-<layout>`` and with
   orbax's ``CheckpointManager`` under ``OUT_DIR/orbax-<layout>``, restores each in these 2
   processes with the training shardings, and compares with what was saved;
4. writes ``OUT_DIR/result-<PROCESS_ID>.json``: per layout and checkpointer, whether the save
   worked (else the error), the largest difference restored - saved; and (process 0)
   ``OUT_DIR/saved-<layout>.npz``, the saved delta and state gathered, for a restore in one
   process.

The model, data, method and layouts are defined here; the test imports them to compute the
single-process reference.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

NUM_PROCESSES = 2
MESH_SHAPE, MESH_AXES = (2, 4), ("data", "model")
ROWS, LENGTH, STEPS = 8, 8, 3
TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
#: AdamW. eps 1e-6 rather than 1e-8: Adam's g / sqrt(v) turns a near-zero gradient entry into a
#: full-size step of either sign, so a float summation order that differs between layouts (all-
#: reduce vs one device) could flip it; 1e-6 keeps such entries' updates small.
OPT = optax.adamw(1e-2, eps=1e-6, weight_decay=0.01)

_KERNELS = r".*/(embedding|kernel)"
_COLUMN = r".*/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel|lm_head/kernel"
_ROW = r".*/(o_proj|down_proj)/kernel"
#: ``{name: (param rules for jpeft.shard_by_rules, batch spec)}``. ``data`` spans the two
#: processes (axis 0 of the mesh), ``model`` the 4 devices of each.
LAYOUTS = {
    # data parallel: every weight replicated, the batch over all 8 devices.
    "dp": ([], P(("data", "model"))),
    # FSDP: every kernel's first axis sharded over "data" (across the processes).
    "fsdp": ([(_KERNELS, P("data", None))], P(("data", "model"))),
    # FSDP + tensor parallel: column-parallel q/k/v/gate/up (out axis on "model"), row-parallel
    # o/down (in axis on "model"), the other axis on "data"; the batch on "data".
    "fsdp_tp": ([(_COLUMN, P("data", "model")), (_ROW, P("model", "data")),
                 (r".*/embedding", P(None, "model"))], P("data")),
}
SAVED = ("dp", "fsdp_tp")


def config():
    from jpeft.models.llama import LlamaConfig
    return LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)


def batch() -> dict:
    """The global batch: ``ids``, ``mask`` int32 ``[ROWS, LENGTH]``, right padded."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, LENGTH + 1, ROWS)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(1, config().vocab_size, (ROWS, LENGTH)).astype(np.int32) * mask
    return {"ids": ids, "mask": mask}


def setup():
    """``(params, method, sites, loss, delta0)``: host (numpy) params and delta, the same in
    every process. ``delta0`` is LoRA's init with noise added (``B`` non-zero, so every factor
    gets a gradient from the first step)."""
    import jpeft
    from flax import nnx
    from jpeft.models.llama import LlamaForCausalLM

    apply, params = jpeft.nnx.split(LlamaForCausalLM(config(), rngs=nnx.Rngs(0)))
    params = jax.tree.map(np.asarray, params)
    b = batch()
    sites = jpeft.probe(apply, params, b["ids"][:2], b["mask"][:2])
    method = jpeft.lora(TARGETS, rank=4, alpha=8.0)
    delta0 = jax.tree.map(np.asarray, method.init(jax.random.key(1), params, sites))
    rng = np.random.default_rng(7)
    delta0 = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype),
                          delta0)
    f = jpeft.wrap(apply, method, sites)

    def loss(params, delta, batch, key):
        del key
        logits = f(params, delta, batch["ids"], batch["mask"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["ids"][:, 1:])
        w = batch["mask"][:, 1:].astype(nll.dtype)
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    return params, method, sites, loss, delta0


def shardings(layout: str, mesh: Mesh, params, method, sites, delta0):
    """``(param, delta, opt_state, batch)`` shardings of ``layout`` on ``mesh``."""
    import jpeft
    rules, batch_spec = LAYOUTS[layout]
    p_sh = jpeft.shard_by_rules(params, mesh, rules)
    d_sh = jpeft.delta_shardings(method, p_sh, delta0, sites)
    o_sh = jpeft.opt_state_shardings(OPT, delta0, d_sh, mesh)
    b_sh = {k: NamedSharding(mesh, batch_spec) for k in ("ids", "mask")}
    return p_sh, d_sh, o_sh, b_sh


def train(loss, params, delta, opt_state, batches, sh=None):
    """``STEPS`` steps of :data:`OPT` (``sh``: the 4 shardings, or ``None`` for one device):
    ``(losses [STEPS], delta, opt_state)``."""
    import jpeft
    kw = {} if sh is None else dict(zip(("param_shardings", "delta_shardings",
                                         "opt_state_shardings", "batch_shardings"), sh))
    step = jpeft.make_train_step(loss, OPT, donate=False, **kw)
    losses = []
    for i in range(STEPS):
        delta, opt_state, m = step(params, delta, opt_state, batches, jax.random.key(i))
        losses.append(float(m["loss"]))
    return np.asarray(losses), delta, opt_state


def flat(tree) -> dict[str, np.ndarray]:
    """``{"/"-joined path: host array}`` (global arrays gathered from every process)."""
    from jax.experimental import multihost_utils
    from jpeft.core import paths as paths_lib
    out = {}
    for path, x in paths_lib.flatten(tree).items():
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        out["/".join(path)] = np.asarray(x)
    return out


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) if a[k].size else 0.0)
               for k in a)


def abstract(tree, sh):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, sh)


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:500] if lines else ''}"


def check_manager(directory: Path, delta, opt_state, d_sh, o_sh, sharded=None) -> dict:
    """Save with :class:`jpeft.checkpoint.Manager` from every process, restore here (and, given
    ``sharded`` ``(delta, opt_state)`` shardings, restore once more into those)."""
    from jpeft import checkpoint
    out = {}
    try:
        with checkpoint.Manager(directory, keep=2) as m:
            m.save(STEPS, delta, opt_state, metadata={"layout": directory.name})
    except Exception as e:     # noqa: BLE001 - the outcome is the test's to judge
        out["save_error"] = _error(e)
        traceback.print_exc()
        return out
    try:
        with checkpoint.Manager(directory, keep=2) as m:
            got = m.restore(abstract(delta, d_sh), abstract(opt_state, o_sh))
        out["restore_diff"] = max(max_diff(flat(got["delta"]), flat(delta)),
                                  max_diff(flat(got["opt_state"]), flat(opt_state)))
        out["restore_sharding_kept"] = all(
            x.sharding == s for x, s in zip(jax.tree.leaves(got["delta"]), jax.tree.leaves(d_sh)))
    except Exception as e:     # noqa: BLE001
        out["restore_error"] = _error(e)
        traceback.print_exc()
    if sharded is not None:
        try:
            with checkpoint.Manager(directory, keep=2) as m:
                got = m.restore(abstract(delta, sharded[0]), abstract(opt_state, sharded[1]))
            out["restore_sharded_diff"] = max(max_diff(flat(got["delta"]), flat(delta)),
                                              max_diff(flat(got["opt_state"]), flat(opt_state)))
        except Exception as e:     # noqa: BLE001
            out["restore_sharded_error"] = _error(e)
    return out


def check_orbax(directory: Path, delta, opt_state, d_sh, o_sh) -> dict:
    """Save with orbax's ``CheckpointManager`` (items ``delta``, ``opt_state``) from every
    process, restore here with the training shardings."""
    import orbax.checkpoint as ocp
    out = {}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(directory, options=options,
                               item_names=("delta", "opt_state")) as m:
        m.save(STEPS, args=ocp.args.Composite(delta=ocp.args.StandardSave(delta),
                                              opt_state=ocp.args.StandardSave(opt_state)))
    with ocp.CheckpointManager(directory, options=options,
                               item_names=("delta", "opt_state")) as m:
        got = m.restore(m.latest_step(), args=ocp.args.Composite(
            delta=ocp.args.StandardRestore(abstract(delta, d_sh)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state, o_sh))))
    out["restore_diff"] = max(max_diff(flat(got["delta"]), flat(delta)),
                              max_diff(flat(got["opt_state"]), flat(opt_state)))
    out["restore_sharding_kept"] = all(
        x.sharding == s for x, s in zip(jax.tree.leaves(got["delta"]), jax.tree.leaves(d_sh)))
    return out


def main(port: int, process_id: int, out_dir: Path) -> None:
    t0 = time.perf_counter()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # before initialize
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=NUM_PROCESSES, process_id=process_id,
                               initialization_timeout=120)
    import jpeft
    from jpeft import distributed

    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4), \
        (jax.process_count(), jax.device_count(), jax.local_device_count())
    mesh = Mesh(np.array(jax.devices()).reshape(MESH_SHAPE), MESH_AXES)
    params, method, sites, loss, delta0 = setup()
    full = batch()
    result: dict = {"process": process_id, "layouts": {}}
    for layout in LAYOUTS:
        p_sh, d_sh, o_sh, b_sh = shardings(layout, mesh, params, method, sites, delta0)
        spec = LAYOUTS[layout][1]
        rows = distributed.process_rows(mesh, spec, ROWS)
        batches = distributed.global_batch({k: v[rows] for k, v in full.items()}, mesh, spec)
        p = jax.device_put(params, p_sh)
        d = jax.device_put(delta0, d_sh)
        s = jpeft.init_opt_state(OPT, d, o_sh)
        losses, d, s = train(loss, p, d, s, batches, (p_sh, d_sh, o_sh, b_sh))
        info = {"rows": [rows.start, rows.stop],
                "delta_sharded_across_processes": any(
                    not x.is_fully_addressable and not x.is_fully_replicated
                    for x in jax.tree.leaves(d)),
                "delta_shardings_kept": all(x.sharding == sh for x, sh in
                                            zip(jax.tree.leaves(d), jax.tree.leaves(d_sh)))}
        delta_flat = flat(d)
        if process_id == 0:
            np.savez(out_dir / f"{layout}.npz", losses=losses, **delta_flat)
        if layout in SAVED:
            # The replicated layout's checkpoint is also restored into FSDP + TP shardings.
            sharded = (None if layout != "dp" else
                       shardings("fsdp_tp", mesh, params, method, sites, delta0)[1:3])
            info["manager"] = check_manager(out_dir / f"manager-{layout}", d, s, d_sh, o_sh,
                                            sharded)
            info["orbax"] = check_orbax(out_dir / f"orbax-{layout}", d, s, d_sh, o_sh)
            state_flat = flat(s)
            if process_id == 0:
                np.savez(out_dir / f"saved-{layout}.npz",
                         **{f"delta/{k}": v for k, v in delta_flat.items()},
                         **{f"opt_state/{k}": v for k, v in state_flat.items()})
        result["layouts"][layout] = info
        print(f"process {process_id}: {layout} done at {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
    (out_dir / f"result-{process_id}.json").write_text(json.dumps(result, indent=1))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
