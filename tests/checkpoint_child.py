"""A training run that checkpoints every step, for the SIGKILL tests of tests/test_checkpoint.py.

``python checkpoint_child.py RUN_DIR STEPS`` trains a tiny least-squares delta with
``jpeft.make_train_step`` (AdamW), and after every step (a) saves the step with a
:class:`jpeft.checkpoint.Manager` under ``RUN_DIR/run`` (keep 2) and (b) overwrites
``RUN_DIR/export`` with :func:`jpeft.checkpoint.save`. It resumes from the manager's latest step
when there is one, and prints ``step N`` after each step's saves. The data of step ``i`` depends
only on ``i``, so an interrupted and resumed run computes what an uninterrupted one does.

``python checkpoint_child.py save PATH VALUE [overwrite]`` saves ``value_tree(VALUE)`` at ``PATH``
and pauses in the middle of the save (orbax has written the arrays, not yet finalized): it prints
``writing``, waits for a line on stdin, finishes and prints ``saved``.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft import checkpoint

W0 = np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)


def batch(i: int) -> dict:
    k1, k2 = jax.random.split(jax.random.fold_in(jax.random.key(0), i))
    return {"x": jax.random.normal(k1, (16, 8)), "y": jax.random.normal(k2, (16, 4))}


def loss(params, delta, b, key):
    del key
    return jnp.mean((b["x"] @ (params["w"] + delta["w"]) + delta["b"] - b["y"]) ** 2)


OPT = optax.adamw(1e-2)
DELTA = {"w": np.zeros((8, 4), np.float32), "b": np.zeros((4,), np.float32)}


def step_fn():
    return jpeft.make_train_step(loss, OPT)


def train(delta, opt_state, start: int, stop: int, step=None, on_step=None):
    step = step or step_fn()
    for i in range(start, stop):
        delta, opt_state, _ = step({"w": W0}, delta, opt_state, batch(i), jax.random.key(i))
        if on_step is not None:
            on_step(i + 1, delta, opt_state)
    return delta, opt_state


def main(run_dir: str, steps: int) -> None:
    manager = checkpoint.Manager(f"{run_dir}/run", keep=2)
    delta, opt_state, start = DELTA, jpeft.init_opt_state(OPT, DELTA), 0
    if manager.latest() is not None:
        got = manager.restore(DELTA, opt_state)
        delta, opt_state, start = got["delta"], got["opt_state"], got["step"]

    def on_step(n, d, s):
        manager.save(n, d, s)
        checkpoint.save(f"{run_dir}/export", d, step=n, overwrite=True)
        print(f"step {n}", flush=True)
    train(delta, opt_state, start, steps, on_step=on_step)
    manager.close()


def value_tree(value: float) -> dict:
    return {"w": W0 * value, "b": np.full((4,), value, np.float32)}


def paused_save(path: str, value: float, overwrite: bool) -> None:
    import orbax.checkpoint as ocp
    finalize = ocp.CompositeCheckpointHandler.finalize

    def paused(self, directory):
        print("writing", flush=True)
        sys.stdin.readline()
        return finalize(self, directory)
    ocp.CompositeCheckpointHandler.finalize = paused
    checkpoint.save(path, value_tree(value), metadata={"v": value}, overwrite=overwrite)
    print("saved", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "save":
        paused_save(sys.argv[2], float(sys.argv[3]), sys.argv[4:] == ["overwrite"])
    else:
        main(sys.argv[1], int(sys.argv[2]))
