"""Multi-process training on one machine: 2 processes (tests/distributed_child.py), 4 CPU devices
each, one 2 x 4 ``("data", "model")`` mesh joined with ``jax.distributed`` and gloo collectives.

The LoRA train step of a tiny LLaMA (AdamW) in 2 processes equals the single-process step for
data-parallel, FSDP and FSDP + tensor-parallel layouts; each process feeds only its own rows
(:mod:`jpeft.distributed`); orbax checkpoints written by both processes restore in 2 processes
and in 1, equal to what was saved.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import distributed_child as child
import jpeft
from jpeft import checkpoint, distributed

CHILD = Path(__file__).with_name("distributed_child.py")
TIMEOUT_S = 240


def _gloo_missing() -> str | None:
    """Why this jax build cannot run CPU collectives over gloo (``None``: it can)."""
    try:
        from jax._src.lib import _jax
    except ImportError:
        return None                     # a newer layout: let the children find out
    if not hasattr(_jax, "make_gloo_tcp_collectives"):
        return "this jaxlib has no gloo CPU collectives (no make_gloo_tcp_collectives)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(out: Path, port: int) -> list[subprocess.Popen]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JPEFT_HOST_MEMORY="release",
               XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                         "--xla_backend_optimization_level=0")
    return [subprocess.Popen([sys.executable, str(CHILD), str(port), str(i), str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             cwd=CHILD.parent)
            for i in range(child.NUM_PROCESSES)]


def _wait(procs: list[subprocess.Popen]) -> list[tuple[int | None, str]]:
    """``(returncode, stderr)`` of each child; all are killed once one fails or time is up."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.wait(), p.communicate()[1]) for p in procs]


def _run_children(out: Path) -> str | None:
    """Run the 2 processes writing to ``out``; ``None`` or what went wrong (their stderr). The
    port is tried again once if the coordinator could not bind it."""
    for attempt in range(2):
        outcome = _wait(_launch(out, _free_port()))
        for i, (_, err) in enumerate(outcome):
            (out / f"stderr-{i}.txt").write_text(err)
        if all(rc == 0 for rc, _ in outcome):
            return None
        text = "\n".join(f"--- process {i}: exit {rc}\n{err[-6000:]}"
                         for i, (rc, err) in enumerate(outcome))
        if attempt == 0 and "ddress already in use" in text:
            continue
        killed = any(rc in (-9, None) for rc, _ in outcome)
        return (f"the 2-process run failed{f' (killed after {TIMEOUT_S} s)' if killed else ''}:"
                f"\n{text}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The output directory of one 2-process run (see tests/distributed_child.py), made once per
    test session: pytest-xdist workers share it (a file lock, the base temporary directory of
    the session) instead of each running the children again."""
    reason = _gloo_missing()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out, failed = root / "jpeft-distributed", root / "jpeft-distributed.failed"
    with open(root / "jpeft-distributed.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists() and not failed.exists():
            out.mkdir()
            error = _run_children(out)
            if error is not None:
                failed.write_text(error)
    if failed.exists():
        pytest.fail(failed.read_text(), pytrace=False)
    return out


def _stderr(run: Path) -> str:
    """The children's stderr (tracebacks of the checkpoint failures they caught), for messages."""
    return "\n".join(f"--- process {i} stderr:\n{(run / f'stderr-{i}.txt').read_text()[-4000:]}"
                     for i in range(child.NUM_PROCESSES))


@pytest.fixture(scope="module")
def results(run):
    return [json.loads((run / f"result-{i}.json").read_text())
            for i in range(child.NUM_PROCESSES)]


@functools.lru_cache(maxsize=None)
def _setup():
    return child.setup()


@pytest.fixture(scope="module")
def reference():
    """``(losses, delta)`` of the single-process, single-device step on the same data."""
    params, _, _, loss, delta0 = _setup()
    state = jpeft.init_opt_state(child.OPT, delta0)
    losses, delta, _ = child.train(loss, params, delta0, state, child.batch())
    return losses, child.flat(delta)


# --------------------------------------------------------------------------- training


@pytest.mark.slow  # the 2-process run: about 15 s alone, 45 s on 2 busy cores
@pytest.mark.parametrize("layout", list(child.LAYOUTS))
def test_two_process_step_equals_single_process(run, results, reference, layout):
    losses, delta = reference
    got = dict(np.load(run / f"{layout}.npz"))
    np.testing.assert_allclose(got.pop("losses"), losses, atol=1e-5, rtol=1e-5)
    assert got.keys() == delta.keys()
    for k in delta:
        np.testing.assert_allclose(got[k], delta[k], atol=1e-5, rtol=1e-5, err_msg=k)
    assert losses[-1] < losses[0]                           # it did train
    for r in results:
        info = r["layouts"][layout]
        assert info["delta_shardings_kept"]
        # FSDP layouts really split the delta between the processes; DP replicates it.
        assert info["delta_sharded_across_processes"] == (layout != "dp")


@pytest.mark.slow  # the 2-process run: about 15 s alone, 45 s on 2 busy cores
def test_each_process_fed_its_own_rows(results):
    half = child.ROWS // 2
    for r in results:
        for layout, info in r["layouts"].items():
            p = r["process"]
            assert info["rows"] == [p * half, (p + 1) * half], (layout, p)


# --------------------------------------------------------------------------- checkpoints


def _load_saved(run: Path, layout: str) -> dict[str, np.ndarray]:
    return dict(np.load(run / f"saved-{layout}.npz"))


def _prefixed(prefix: str, d: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in d.items()}


def _like(sh_of):
    """Abstract delta and optimizer state, placed with ``sh_of(param/delta/opt shardings)``."""
    params, method, sites, _, delta0 = _setup()
    state = jax.eval_shape(child.OPT.init, delta0)
    d_sh, o_sh = sh_of(params, method, sites, delta0)
    return child.abstract(delta0, d_sh), child.abstract(state, o_sh)


def _single_device(params, method, sites, delta0):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = jax.eval_shape(child.OPT.init, delta0)
    return jax.tree.map(lambda _: dev, delta0), jax.tree.map(lambda _: dev, state)


def _local_mesh(layout):
    """The same layout on this process's first 8 devices (conftest's forced host devices)."""
    def sh_of(params, method, sites, delta0):
        if jax.device_count() < 8:
            pytest.skip("needs 8 local devices for the 1-process sharded restore")
        mesh = Mesh(np.array(jax.devices()[:8]).reshape(child.MESH_SHAPE), child.MESH_AXES)
        return child.shardings(layout, mesh, params, method, sites, delta0)[1:3]
    return sh_of


def _orbax_restore(directory: Path, delta_like, state_like):
    import orbax.checkpoint as ocp
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options,
                               item_names=("delta", "opt_state")) as m:
        got = m.restore(m.latest_step(), args=ocp.args.Composite(
            delta=ocp.args.StandardRestore(delta_like),
            opt_state=ocp.args.StandardRestore(state_like)))
    return got["delta"], got["opt_state"]


@pytest.mark.slow  # the 2-process run: about 15 s alone, 45 s on 2 busy cores
@pytest.mark.parametrize("layout", child.SAVED)
def test_orbax_checkpoint_of_two_processes_restores_in_two_and_in_one(run, results, layout):
    for r in results:                                       # restored in the 2 processes
        assert r["layouts"][layout]["orbax"] == {"restore_diff": 0.0,
                                                 "restore_sharding_kept": True}
    saved = _load_saved(run, layout)
    for where in (_single_device, _local_mesh(layout)):     # restored in this 1 process
        delta, state = _orbax_restore(run / f"orbax-{layout}", *_like(where))
        got = {**_prefixed("delta", child.flat(delta)), **_prefixed("opt_state", child.flat(state))}
        assert got.keys() == saved.keys()
        for k in saved:
            np.testing.assert_array_equal(got[k], saved[k], err_msg=k)


@pytest.mark.slow  # the 2-process run: about 15 s alone, 45 s on 2 busy cores
def test_manager_of_two_processes_with_a_replicated_delta(run, results):
    """Data parallel (every array replicated): :class:`jpeft.checkpoint.Manager` saves from both
    processes, restores in both (checksums verified) and in this one process."""
    for r in results:
        info = r["layouts"]["dp"]["manager"]
        assert info == {"restore_diff": 0.0, "restore_sharding_kept": True,
                        **{k: v for k, v in info.items() if k.startswith("restore_sharded")}}, \
            f"{info}\n{_stderr(run)}"
    saved = _load_saved(run, "dp")
    for where in (_single_device, _local_mesh("fsdp_tp")):
        with checkpoint.Manager(run / "manager-dp") as m:
            assert m.steps() == [child.STEPS]
            got = m.restore(*_like(where))
        assert got["step"] == child.STEPS and got["metadata"] == {"layout": "manager-dp"}
        flat = {**_prefixed("delta", child.flat(got["delta"])),
                **_prefixed("opt_state", child.flat(got["opt_state"]))}
        assert flat.keys() == saved.keys()
        for k in saved:
            np.testing.assert_array_equal(flat[k], saved[k], err_msg=k)


@pytest.mark.slow  # the 2-process run: about 15 s alone, 45 s on 2 busy cores
def test_manager_of_two_processes_with_a_sharded_delta(run, results):
    """jpeft.checkpoint.Manager saves a delta sharded across the two processes (each CRC-32 taken
    on the gathered leaf) and restores it in 2 processes, sharding kept, and in this one process;
    a replicated one restores into shardings across processes."""
    for r in results:
        assert r["layouts"]["fsdp_tp"]["manager"] == {"restore_diff": 0.0,
                                                      "restore_sharding_kept": True}
        assert r["layouts"]["dp"]["manager"]["restore_sharded_diff"] == 0.0
    saved = _load_saved(run, "fsdp_tp")
    with checkpoint.Manager(run / "manager-fsdp_tp") as m:
        got = m.restore(*_like(_single_device))
    flat = {**_prefixed("delta", child.flat(got["delta"])),
            **_prefixed("opt_state", child.flat(got["opt_state"]))}
    assert flat.keys() == saved.keys()
    for k in saved:
        np.testing.assert_array_equal(flat[k], saved[k], err_msg=k)


# --------------------------------------------------------------------------- input helpers


def test_process_rows_and_global_batch_in_one_process(mesh):
    """In one process every row is this process's, and the global batch is a device_put."""
    assert distributed.process_rows(mesh, P("data"), 8) == slice(0, 8)
    assert distributed.process_rows(mesh, P(("data", "model")), 16) == slice(0, 16)
    assert distributed.process_rows(mesh, P(), 5) == slice(0, 5)
    local = {"ids": np.arange(24, dtype=np.int32).reshape(8, 3), "w": np.ones((8,), np.float32)}
    got = distributed.global_batch(local, mesh, P(("data", "model")))
    for k, x in got.items():
        assert x.sharding == NamedSharding(mesh, P(("data", "model")))
        assert len(x.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(x), local[k])


def test_input_helpers_reject_bad_inputs(mesh):
    with pytest.raises(ValueError, match="process 3 has no device"):
        distributed.process_rows(mesh, P("data"), 8, process_index=3)
    with pytest.raises(ValueError, match="cannot be sharded"):
        distributed.process_rows(mesh, P(("data", "model")), 6)
    with pytest.raises(ValueError, match="after the batch axis"):
        distributed.global_batch({"x": np.ones((8, 4))}, mesh, P("data", "model"))
    with pytest.raises(ValueError, match=r"\['s'\] is a scalar"):
        distributed.global_batch({"s": np.float32(1)}, mesh, P("data"))
    with pytest.raises(ValueError, match=r"\['x'\] \(6, 2\) does not fit"):
        distributed.global_batch({"x": np.ones((6, 2))}, mesh, P(("data", "model")))
