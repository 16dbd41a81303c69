"""Delta checkpoints: round trip, only the delta on disk, shape errors, exact resume; and faults:
saves killed at every point (overwrite included), flipped and truncated bytes, wrong dtypes, runs
killed with SIGKILL and resumed."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import jpeft
from jpeft import checkpoint


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def lora_setup(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.lora(("query", "value"), rank=2)
    delta = jax.tree.map(lambda x: x + 0.05, method.init(jax.random.key(0), variables, tiny_sites))
    return model, variables, method, delta, tiny_batch, tiny_sites


def test_round_trip_reproduces_outputs(lora_setup, tmp_path):
    model, variables, method, delta, batch, sites = lora_setup
    checkpoint.save(tmp_path / "ck", delta, metadata={"config": method.config})
    like = jax.eval_shape(lambda k, v: method.init(k, v, sites), jax.random.key(0), variables)
    got = checkpoint.restore(tmp_path / "ck", like)
    jax.tree.map(np.testing.assert_array_equal, got["delta"], delta)
    assert got["metadata"]["config"]["rank"] == 2 and got["step"] is None
    f = jpeft.wrap(model.apply, method, sites)
    np.testing.assert_array_equal(f(variables, got["delta"], **batch), f(variables, delta, **batch))
    # Only the delta is stored: far less than the base weights.
    assert _dir_bytes(tmp_path / "ck") < jpeft.num_bytes(variables) / 4


def test_shape_mismatch_names_the_entry(lora_setup, tmp_path):
    _, variables, _, delta, _, sites = lora_setup
    checkpoint.save(tmp_path / "ck", delta)
    shapes = lambda m: jax.eval_shape(lambda k, v: m.init(k, v, sites), jax.random.key(0), variables)
    like = shapes(jpeft.lora(("query", "value"), rank=3))
    with pytest.raises(ValueError, match=r"query/kernel/lora_A: checkpoint has shape \(32, 2\), expected \(32, 3\)"):
        checkpoint.restore(tmp_path / "ck", like)
    like = shapes(jpeft.lora(("query",), rank=2))
    with pytest.raises(ValueError, match="not expected: delta/.*value"):
        checkpoint.restore(tmp_path / "ck", like)


def test_refuses_to_overwrite_and_missing_dir(lora_setup, tmp_path):
    _, _, _, delta, _, _ = lora_setup
    checkpoint.save(tmp_path / "ck", delta)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True to replace it"):
        checkpoint.save(tmp_path / "ck", delta)
    checkpoint.save(tmp_path / "ck", delta, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no jpeft checkpoint at .*nothing"):
        checkpoint.restore(tmp_path / "nothing", delta)


def test_resumed_run_continues_exactly(lora_setup, tmp_path):
    model, variables, method, delta, batch, sites = lora_setup
    batch = dict(batch, labels=np.array([1, 0, 1], np.int32))
    f = jpeft.wrap(model.apply, method, sites)

    def loss(p, d, b, k):
        logits = f(p, d, b["input_ids"], b["attention_mask"], b["token_type_ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()
    opt = optax.adamw(1e-2)
    step = jpeft.make_train_step(loss, opt, donate=False)
    keys = [jax.random.key(i) for i in range(4)]

    d, s = delta, jpeft.init_opt_state(opt, delta)
    for k in keys:
        d, s, _ = step(variables, d, s, batch, k)
    straight = d

    d, s = delta, jpeft.init_opt_state(opt, delta)
    for k in keys[:2]:
        d, s, _ = step(variables, d, s, batch, k)
    checkpoint.save(tmp_path / "ck", d, opt_state=s, step=2)
    got = checkpoint.restore(tmp_path / "ck", delta, opt_state_like=s)
    assert got["step"] == 2
    d, s = got["delta"], got["opt_state"]
    for k in keys[got["step"]:]:
        d, s, _ = step(variables, d, s, batch, k)
    jax.tree.map(np.testing.assert_array_equal, d, straight)


# --------------------------------------------------------------------------------------------
# Faults

TREE = {"w": np.arange(600, dtype=np.float32).reshape(20, 30) / 7, "b": {"c": np.ones(5, np.int32)}}


def _versions(tmp_path):
    """Two complete checkpoints of the same tree with different values, as directories."""
    a = checkpoint.save(tmp_path / "a", TREE, metadata={"v": "a"})
    b = checkpoint.save(tmp_path / "b", jax.tree.map(lambda x: x + 1, TREE), metadata={"v": "b"})
    return a, b


def _which(path):
    return checkpoint.restore(path, TREE)["metadata"]["v"]


@pytest.mark.parametrize("point", ["writing", "written", "old_aside", "new_in", "deleting_old"])
def test_overwrite_killed_at_any_point_keeps_a_complete_checkpoint(tmp_path, point):
    """The states a SIGKILL can leave while ``save(ck, new, overwrite=True)`` replaces ``old``,
    built on disk; the next access finds a complete checkpoint (the new one once it was complete
    and set in place) and no leftovers."""
    old, new = _versions(tmp_path)
    ck = tmp_path / "ck"
    shutil.copytree(old, ck)
    tmp, aside = tmp_path / ".ck.jpeft-tmp-1234", tmp_path / ".ck.jpeft-old-1234"
    if point == "writing":             # orbax still writing the temporary: no meta yet
        shutil.copytree(new, tmp)
        shutil.rmtree(tmp / "meta")
    elif point == "written":           # temporary complete, nothing renamed yet
        shutil.copytree(new, tmp)
    elif point == "old_aside":         # old renamed aside, new not yet in place
        shutil.copytree(new, tmp)
        os.rename(ck, aside)
    elif point == "new_in":            # new in place, old not yet deleted
        os.rename(ck, aside)
        shutil.copytree(new, ck)
    else:                              # old half deleted
        shutil.copytree(old, aside)
        shutil.rmtree(aside / "delta")
        shutil.rmtree(ck)
        shutil.copytree(new, ck)
    want = "a" if point in ("writing", "written") else "b"
    assert _which(ck) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "ck"]


def test_a_partial_temporary_is_never_taken_for_a_checkpoint(tmp_path):
    _, new = _versions(tmp_path)
    shutil.copytree(new, tmp_path / ".ck.jpeft-tmp-1")
    shutil.rmtree(tmp_path / ".ck.jpeft-tmp-1" / "meta")
    with pytest.raises(FileNotFoundError, match="no jpeft checkpoint"):
        checkpoint.restore(tmp_path / "ck", TREE)
    assert not (tmp_path / ".ck.jpeft-tmp-1").exists()


def _data_files(path):
    return sorted((f for f in Path(path, "delta").rglob("*") if f.is_file()
                   and f.stat().st_size > 150), key=lambda f: -f.stat().st_size)


def _restored_or_error(path):
    """The restored tree, or the CheckpointError: never anything else."""
    try:
        return checkpoint.restore(path, TREE)["delta"]
    except checkpoint.CheckpointError as e:
        return e


# orbax's reader, failing on a damaged file, can leave a callback for its closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_flipped_bytes_are_an_error_naming_the_damage_or_harmless(tmp_path):
    """A byte flipped anywhere in the stored arrays' files: either one CheckpointError (orbax
    cannot read the item, or it reads it and the checksum names the entry whose bytes changed) or,
    for bytes no value depends on, the saved values exactly; never a silently wrong value."""
    ck = checkpoint.save(tmp_path / "ck", TREE)
    seen = set()
    for f in _data_files(ck):
        data = f.read_bytes()
        for pos in np.linspace(0, len(data) - 1, 12).astype(int):
            f.write_bytes(data[:pos] + bytes([data[pos] ^ 0x5A]) + data[pos + 1:])
            got = _restored_or_error(ck)
            if isinstance(got, Exception):
                assert "is damaged" in str(got) and "nothing was restored" in str(got), got
                seen.add("checksum" if re.search(r"the bytes of delta/(w|b/c) differ", str(got))
                         else "unreadable")
            else:
                jax.tree.map(np.testing.assert_array_equal, got, TREE)
        f.write_bytes(data)
    assert seen == {"checksum", "unreadable"}
    jax.tree.map(np.testing.assert_array_equal, checkpoint.restore(ck, TREE)["delta"], TREE)


def test_truncated_file_and_damaged_meta_are_one_clear_error(tmp_path):
    ck = checkpoint.save(tmp_path / "ck", TREE)
    f = _data_files(ck)[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="is damaged: delta cannot be read"):
        checkpoint.restore(ck, TREE)
    ck2 = checkpoint.save(tmp_path / "ck2", TREE)
    meta = next(p for p in (ck2 / "meta").iterdir() if p.name == "metadata")
    meta.write_bytes(meta.read_bytes()[:40])
    with pytest.raises(checkpoint.CheckpointError, match="its meta item cannot be read"):
        checkpoint.restore(ck2, TREE)


def test_wrong_dtype_is_named(tmp_path):
    ck = checkpoint.save(tmp_path / "ck", TREE)
    like = {"w": jax.ShapeDtypeStruct((20, 30), jax.numpy.bfloat16), "b": TREE["b"]}
    with pytest.raises(checkpoint.CheckpointError,
                       match="delta/w: checkpoint has dtype float32, expected bfloat16"):
        checkpoint.restore(ck, like)


CHILD = Path(__file__).with_name("checkpoint_child.py")


def test_runs_killed_with_sigkill_resume_exactly(tmp_path):
    """A run that saves every step (manager + overwritten export) is killed with SIGKILL at random
    moments, in steps and in saves, several times; every time the export restores to a complete
    step's delta, and the run resumed from its manager reaches the uninterrupted run's delta bit
    for bit."""
    sys.path.insert(0, str(CHILD.parent))
    import checkpoint_child as child
    steps = 30
    step = child.step_fn()
    history = {}
    child.train(child.DELTA, jpeft.init_opt_state(child.OPT, child.DELTA), 0, steps, step,
                on_step=lambda n, d, s: history.__setitem__(n, jax.tree.map(np.asarray, d)))
    rng = np.random.default_rng(0)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path))
    resumed_from = []
    for trial in range(3):
        run = tmp_path / f"t{trial}"
        proc = subprocess.Popen([sys.executable, str(CHILD), str(run), "100000"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        first = proc.stdout.readline()                 # the loop is running
        assert first.startswith(b"step"), first
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        printed = [int(x.split()[1]) for x in [first] + proc.stdout.read().splitlines()]
        exported = checkpoint.restore(run / "export", child.DELTA)
        n = exported["step"]
        assert n >= printed[-1]
        if n <= steps:
            jax.tree.map(np.testing.assert_array_equal, exported["delta"], history[n])
        manager = checkpoint.Manager(run / "run", keep=2)
        latest = manager.latest()
        # killed between a save and the removal of the oldest step: keep + 1 steps, all complete
        assert latest is not None and latest >= printed[-1] and len(manager.steps()) <= 3
        for s in manager.steps():
            assert manager.restore(child.DELTA, jpeft.init_opt_state(child.OPT, child.DELTA),
                                   step=s)["step"] == s
        if latest >= steps:                           # ran past the reference: restart at 0
            continue
        got = manager.restore(child.DELTA, jpeft.init_opt_state(child.OPT, child.DELTA))
        manager.close()
        resumed_from.append(got["step"])
        final, _ = child.train(got["delta"], got["opt_state"], got["step"], steps, step)
        jax.tree.map(np.testing.assert_array_equal, final, history[steps])
    assert resumed_from, "every run was killed after the reference length; lower the delays"


def test_manager_deletes_by_renaming_and_survives_a_killed_deletion(tmp_path):
    """Steps beyond ``keep`` leave the run by a rename before any file is deleted: a half-deleted
    step (a deletion killed midway) lies only in the trash, which the next open empties; an extra
    complete step left by a kill before the rename is removed by the next save."""
    with checkpoint.Manager(tmp_path / "run", keep=3) as m:
        for n in (1, 2, 3):
            m.save(n, jax.tree.map(lambda a: a + n, TREE))
    trash = tmp_path / "run" / ".jpeft-deleted"
    shutil.copytree(tmp_path / "run" / "1", trash / "1")           # a deletion killed midway
    for f in sorted(p for p in (trash / "1").rglob("*") if p.is_file())[::2]:
        f.unlink()
    with checkpoint.Manager(tmp_path / "run", keep=2) as m:
        assert not trash.exists() and m.steps() == [1, 2, 3]
        for n in m.steps():
            np.testing.assert_array_equal(m.restore(TREE, step=n)["delta"]["w"], TREE["w"] + n)
        m.save(4, TREE)
        assert m.steps() == [3, 4] and not trash.exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["3", "4"]
