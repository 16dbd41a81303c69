"""Delta checkpoints: round trip, only the delta on disk, shape errors, exact resume; and faults:
saves killed at every point (overwrite included), flipped and truncated bytes, wrong dtypes, runs
killed with SIGKILL and resumed."""

import os
import re
import shutil
import signal
import subprocess
import sys
import errno
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
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


def _dead_owner():
    """The owner part of a temporary's name for a process of this host that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return f"{checkpoint._host_key()}-{proc.pid}-0-1234"


@pytest.mark.parametrize("point", ["writing", "written", "old_aside", "new_in", "exchanged",
                                   "deleting_old"])
def test_overwrite_killed_at_any_point_keeps_a_complete_checkpoint(tmp_path, point):
    """The states a SIGKILL can leave while ``save(ck, new, overwrite=True)`` replaces ``old``,
    built on disk; the next access finds a complete checkpoint (the new one once it was complete
    and set in place) and no leftovers."""
    old, new = _versions(tmp_path)
    ck = tmp_path / "ck"
    shutil.copytree(old, ck)
    tmp = tmp_path / f".ck.jpeft-tmp-{_dead_owner()}"
    tmp.mkdir()
    if point == "writing":             # orbax still writing the temporary: no meta yet
        shutil.copytree(new, tmp / "ckpt.orbax-checkpoint-tmp")
        shutil.rmtree(tmp / "ckpt.orbax-checkpoint-tmp" / "meta")
    elif point == "written":           # temporary complete, nothing renamed yet
        shutil.copytree(new, tmp / "ckpt")
    elif point == "old_aside":         # no exchange: old renamed aside, new not yet in place
        shutil.copytree(new, tmp / "ckpt")
        os.rename(ck, tmp / "old")
    elif point == "new_in":            # no exchange: new in place, old not yet deleted
        os.rename(ck, tmp / "old")
        shutil.copytree(new, ck)
    elif point == "exchanged":         # exchanged: the temporary holds the old one
        os.rename(ck, tmp / "ckpt")
        shutil.copytree(new, ck)
    else:                              # old half deleted
        shutil.copytree(old, tmp / "ckpt")
        shutil.rmtree(tmp / "ckpt" / "delta")
        shutil.rmtree(ck)
        shutil.copytree(new, ck)
    want = "a" if point in ("writing", "written") else "b"
    assert _which(ck) == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "ck"]


def test_a_partial_temporary_is_never_taken_for_a_checkpoint(tmp_path):
    _, new = _versions(tmp_path)
    tmp = tmp_path / f".ck.jpeft-tmp-{_dead_owner()}"
    shutil.copytree(new, tmp / "ckpt")
    shutil.rmtree(tmp / "ckpt" / "meta")
    with pytest.raises(FileNotFoundError, match="no jpeft checkpoint"):
        checkpoint.restore(tmp_path / "ck", TREE)
    assert not tmp.exists()


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
    with pytest.raises(checkpoint.CheckpointError, match="is damaged: delta/w cannot be read"):
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


# --------------------------------------------------------------------------------------------
# Concurrent saves and failed writes

NESTED = {"layer": {"0": {"query": {"lora_a": np.linspace(0, 1, 4096, dtype=np.float32
                                                            ).reshape(64, 64),
                                    "lora_b": np.ones((64, 2), np.float32)}}}}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_an_unreadable_array_names_its_entry_without_debris(tmp_path, damage):
    """Truncated or flipped bytes in an array's data file: one CheckpointError naming the entry
    by its tree path, with a clean cause."""
    ck = checkpoint.save(tmp_path / "ck", NESTED)
    f = _data_files(ck)[0]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate"
                  else bytes([data[0] ^ 0x5A]) + data[1:])
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.restore(ck, NESTED)
    msg = str(info.value)
    assert "delta/layer/0/query/lora_a" in msg and "nothing was restored" in msg, msg
    assert "pybind11" not in msg and "<bound method" not in msg and "source locations" not in msg


def _child(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, str(CHILD), *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def _temporaries(path):
    return sorted(p.name for p in path.iterdir() if ".jpeft-tmp-" in p.name)


def test_a_save_running_in_another_process_is_never_disturbed(tmp_path):
    """While another process is in the middle of overwriting ``ck``, this one reads ``ck``
    (metadata, restore), refuses to save it without overwrite, and saves and restores another
    checkpoint in the same folder; the other save then completes and its checkpoint restores."""
    sys.path.insert(0, str(CHILD.parent))
    import checkpoint_child as child
    ck = checkpoint.save(tmp_path / "ck", child.value_tree(1.0), metadata={"v": 1.0})
    proc = _child("save", ck, 2.0, "overwrite")
    try:
        assert proc.stdout.readline() == b"writing\n", proc.stderr.read()
        assert len(_temporaries(tmp_path)) == 1
        assert checkpoint.metadata(ck)["metadata"] == {"v": 1.0}
        got = checkpoint.restore(ck, child.value_tree(0.0))
        jax.tree.map(np.testing.assert_array_equal, got["delta"], child.value_tree(1.0))
        with pytest.raises(FileExistsError):
            checkpoint.save(ck, TREE)
        checkpoint.save(tmp_path / "other", TREE)
        jax.tree.map(np.testing.assert_array_equal,
                     checkpoint.restore(tmp_path / "other", TREE)["delta"], TREE)
        assert len(_temporaries(tmp_path)) == 1
        out, err = proc.communicate(b"go\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out == b"saved\n", err.decode()[-2000:]
    got = checkpoint.restore(ck, child.value_tree(0.0))
    assert got["metadata"] == {"v": 2.0}
    jax.tree.map(np.testing.assert_array_equal, got["delta"], child.value_tree(2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "other"]


def test_a_temporary_of_a_killed_process_is_removed(tmp_path):
    proc = _child("save", tmp_path / "ck", 2.0)
    try:
        assert proc.stdout.readline() == b"writing\n", proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert len(_temporaries(tmp_path)) == 1
    with pytest.raises(FileNotFoundError, match="no jpeft checkpoint"):
        checkpoint.metadata(tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_a_temporary_of_another_host_is_reported_not_removed(tmp_path):
    host = "0" * 8 if checkpoint._host_key() != "0" * 8 else "1" * 8
    tmp = tmp_path / f".ck.jpeft-tmp-{host}-1-1-abcd"
    tmp.mkdir()
    (tmp / "owner.json").write_text('{"host": "node7", "pid": 1, "created": 0}')
    with pytest.warns(checkpoint.CheckpointWarning,
                      match="by process 1 on host 'node7'.*not removed automatically"):
        with pytest.raises(FileNotFoundError):
            checkpoint.restore(tmp_path / "ck", TREE)
    assert tmp.exists()


def test_racing_saves_without_overwrite_one_wins(tmp_path):
    """Two processes save ``ck`` without overwrite, both past the existence check and done
    writing the arrays before either puts its checkpoint in place: exactly one succeeds, the other
    raises FileExistsError, and ``ck`` is the winner's, intact."""
    sys.path.insert(0, str(CHILD.parent))
    import checkpoint_child as child
    procs = {v: _child("save", tmp_path / "ck", v) for v in (1.0, 2.0)}
    try:
        for p in procs.values():
            assert p.stdout.readline() == b"writing\n", p.stderr.read()
        for p in procs.values():
            p.stdin.write(b"go\n")
            p.stdin.flush()
        done = {v: p.communicate(timeout=120) for v, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    winners = [v for v, p in procs.items() if p.returncode == 0]
    assert len(winners) == 1, {v: err.decode()[-500:] for v, (_, err) in done.items()}
    (loser,) = set(procs) - set(winners)
    assert "FileExistsError" in done[loser][1].decode()
    assert "another save wrote it first" in done[loser][1].decode()
    got = checkpoint.restore(tmp_path / "ck", child.value_tree(0.0))
    assert got["metadata"] == {"v": winners[0]}
    jax.tree.map(np.testing.assert_array_equal, got["delta"], child.value_tree(winners[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def _fail_finalize(monkeypatch):
    """orbax fails after writing the arrays into its temporary, as on a full disk."""
    def finalize(self, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", finalize)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failed_write_leaves_nothing_and_says_so(tmp_path, monkeypatch, overwrite):
    old = checkpoint.save(tmp_path / "ck", TREE, metadata={"v": "a"}) if overwrite else None
    _fail_finalize(monkeypatch)
    kept = "; the checkpoint already at .*ck is intact" if overwrite else ""
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"saving .*ck failed: No space left on device \\(ENOSPC\\); "
                             f"nothing was left behind{kept}"):
        checkpoint.save(tmp_path / "ck", jax.tree.map(lambda x: x + 1, TREE),
                        metadata={"v": "b"}, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ck"] if overwrite else [])
    if overwrite:
        monkeypatch.undo()
        assert _which(old) == "a"


def test_a_real_file_size_error_leaves_nothing(tmp_path):
    """tensorstore itself fails to write (EFBIG under RLIMIT_FSIZE): one CheckpointError, no
    files left."""
    resource = pytest.importorskip("resource")
    big = {"w": np.random.default_rng(0).normal(size=(100_000,)).astype(np.float32)}
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, hard))
    try:
        with pytest.raises(checkpoint.CheckpointError,
                           match=r"saving .*ck failed: File too large \(EFBIG\); nothing was "
                                 r"left behind$"):
            checkpoint.save(tmp_path / "ck", big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("swap", ["exchange", "rename"])
@pytest.mark.parametrize("stage", ["before_write", "during_write", "after_write", "swap",
                                   "after_swap"])
def test_an_overwrite_failing_at_any_stage_keeps_old_or_new(tmp_path, monkeypatch, stage, swap):
    """``save(ck, new, overwrite=True)`` fails at each stage (with the atomic exchange, and with
    the rename-aside fallback): afterwards ``ck`` restores completely as the old or, once the new
    one was in place, the new checkpoint, never neither nor a mix, and nothing else is left."""
    old, new = _versions(tmp_path)
    ck = checkpoint.save(tmp_path / "ck", TREE, metadata={"v": "a"})
    new_tree = jax.tree.map(lambda x: x + 1, TREE)
    if swap == "rename":
        monkeypatch.setattr(checkpoint, "_renameat2", lambda src, dst, flags: False)
    fail = OSError(errno.EIO, os.strerror(errno.EIO))
    if stage == "before_write":
        monkeypatch.setattr(ocp.Checkpointer, "save", lambda *a, **k: (_ for _ in ()).throw(fail))
    elif stage == "during_write":
        _fail_finalize(monkeypatch)
    elif stage == "after_write":
        monkeypatch.setattr(checkpoint, "_fsync_dir", lambda p: (_ for _ in ()).throw(fail))
    elif stage == "swap":
        rename, renameat2 = os.rename, checkpoint._renameat2

        def failing_rename(src, dst, *a, **k):
            if Path(dst) == ck and Path(src).name == "ckpt":
                raise fail
            return rename(src, dst, *a, **k)

        def failing_renameat2(src, dst, flags):
            if Path(dst) == ck:
                raise fail
            return renameat2(src, dst, flags)
        monkeypatch.setattr(os, "rename", failing_rename)
        if swap == "exchange":
            monkeypatch.setattr(checkpoint, "_renameat2", failing_renameat2)
    else:
        remove = checkpoint._remove
        monkeypatch.setattr(checkpoint, "_remove", lambda p: shutil.rmtree(p / "ckpt" / "delta")
                            if (p / "ckpt").exists() else remove(p))
    try:
        checkpoint.save(ck, new_tree, metadata={"v": "b"}, overwrite=True)
        saved = True
    except checkpoint.CheckpointError as e:
        saved = False
        assert "nothing was left behind; the checkpoint already at" in str(e), e
    monkeypatch.undo()
    got = checkpoint.restore(ck, TREE)
    want = "b" if saved else "a"
    assert got["metadata"] == {"v": want} and saved == (stage == "after_swap")
    jax.tree.map(np.testing.assert_array_equal, got["delta"], new_tree if saved else TREE)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["a", "b", "ck"] or stage == "after_swap", leftovers


# One layout for jpeft.checkpoint and jpeft.save; a directory that does not fit says what it holds.


def _shapes(method, variables, sites):
    return jax.eval_shape(lambda k: method.init(k, variables, sites), jax.random.key(0))


def _lora_head():
    return jpeft.compose(lora=jpeft.lora(("query", "value"), rank=2),
                         head=jpeft.full_finetune(("classifier",)))


def test_restore_reads_what_jpeft_save_writes(lora_setup, tmp_path):
    _, variables, _, _, _, sites = lora_setup
    method = _lora_head()
    delta = jax.tree.map(lambda x: x + 0.5, method.init(jax.random.key(0), variables, sites))
    jpeft.save(tmp_path / "m", method, delta, step=3)
    got = checkpoint.restore(tmp_path / "m", _shapes(method, variables, sites))
    jax.tree.map(np.testing.assert_array_equal, got["delta"], delta)
    assert got["step"] == 3 and got["metadata"]["name"] == "lora+head"


def test_restore_of_a_jpeft_save_directory_that_does_not_fit_says_to_use_jpeft_load(
        lora_setup, tmp_path):
    _, variables, _, _, _, sites = lora_setup
    method = _lora_head()
    jpeft.save(tmp_path / "m", method, method.init(jax.random.key(0), variables, sites))
    other_rank = jpeft.compose(lora=jpeft.lora(("query", "value"), rank=3),
                               head=jpeft.full_finetune(("classifier",)))
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(
            "does not fit the tree to restore into (this directory was written by jpeft.save "
            "(method 'lora+head'); read it with jpeft.load(path, params, sites)") + r".*\n  delta/"
            r"lora/params/bert/encoder/layer/0/attention/self/query/kernel/lora_A: checkpoint "
            r"has shape \(32, 2\), expected \(32, 3\)"):
        checkpoint.restore(tmp_path / "m", _shapes(other_rank, variables, sites))


def test_a_template_of_another_method_names_both_methods(lora_setup, tmp_path):
    """Not a list of 20 missing entries: the stored method and the template's."""
    _, variables, _, delta, _, sites = lora_setup
    method = _lora_head()
    jpeft.save(tmp_path / "m", method, method.init(jax.random.key(0), variables, sites))
    ia3 = _shapes(jpeft.ia3(), variables, sites)
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.restore(tmp_path / "m", ia3)
    assert str(raised.value) == (
        f"checkpoint {tmp_path / 'm'} holds method 'lora+head' (leaves bias, kernel, lora_A, "
        f"lora_B); the template is of another method: ia3 (leaves ia3_l). This directory was "
        f"written by jpeft.save (method 'lora+head'); read it with jpeft.load(path, params, "
        f"sites), which rebuilds the method and checks its delta against the base")
    checkpoint.save(tmp_path / "bare", delta)            # a bare LoRA delta: no method record
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(
            "holds a delta that looks like lora (leaves lora_A, lora_B); the template is of "
            "another method: ia3 (leaves ia3_l). Restore it with a template of the stored "
            "method's delta")) as raised:
        checkpoint.restore(tmp_path / "bare", ia3)
    assert "missing in checkpoint" not in str(raised.value)
