"""Intrinsic-dimension fine-tuning (DID / SAID) on the default task (MiniLM + movie sentiment).

Every MiniLM weight except the classification head moves inside one random ``d``-dimensional
subspace (:mod:`jpeft.methods.intrinsic`, a Fastfood projection per tensor, embeddings included as
in the paper); the 770-parameter head is trained directly, outside the ``d`` budget (it starts
random, so it cannot be reached through the projection of the pretrained weights).

:func:`train_intrinsic` trains and evaluates one configuration; :func:`run_intrinsic` is the demo:
it also saves the delta (``theta_d``, ``lambda``, the head; the seed and ``d`` go into the
checkpoint's metadata), rebuilds the method *from that metadata alone*, reloads the base model and
the delta from disk, checks that the dev predictions are identical bit for bit, and that the
merged model predicts the same.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jpeft import checkpoint
from jpeft.core import method as method_lib
from jpeft.core import tree as tree_lib
from jpeft.methods import intrinsic
from jpeft.methods.full import full_finetune
from jpeft.recipes import movies

#: Peak Adam learning rate of ``theta_d`` and ``lambda`` is ``LR_SCALE / sqrt(d)``: a unit of
#: ``theta_d`` moves every tensor by about unit norm, and Adam moves all ``d`` coordinates at once,
#: so a step moves each tensor by about ``lr sqrt(d)``. Tuned on the movie task (40 steps of batch
#: 16): at d = 1000, lr 1e-3 beat 3e-4, 3e-3 and 1e-2; at d = 10000, 3e-4 beat 1e-3; at d = 100, 3e-3
#: and 1e-2 tied.
LR_SCALE = 0.03
DEFAULT_HEAD_LR = 1e-2


def default_lr(d: int) -> float:
    """``LR_SCALE / sqrt(d)``."""
    return LR_SCALE / math.sqrt(d)


def build_method(d: int, *, said: bool = True, seed: int = 0,
                 exclude: tuple[str, ...] = ("classifier",)) -> method_lib.Method:
    """``compose(said|did=<d, everything but the head>, head=full_finetune(("classifier",)))``."""
    part = (intrinsic.said if said else intrinsic.did)(d, seed=seed, exclude=exclude)
    return method_lib.compose(**{part.name: part},
                              head=full_finetune(("classifier",), name="head"))


def rebuild_from_metadata(directory: str | Path) -> method_lib.Method:
    """The method of a checkpoint written by :func:`run_intrinsic`, from its metadata alone."""
    parts = checkpoint.metadata(directory)["metadata"]["config"]["compose"]
    name = next(n for n in parts if n in ("did", "said"))
    return method_lib.compose(**{name: intrinsic.from_config(parts[name])},
                              head=full_finetune(("classifier",), name="head"))


def single_shape(task: movies.Task) -> movies.Task:
    """``task`` with one padded length (its longest bucket) instead of length buckets.

    Every new batch shape recompiles the train step, and with it the ~100 projections (about 10 s
    each time on a CPU); a single shape compiles once. Short sentences then pay for the padding in
    the model, which costs less than the projections do.
    """
    return task._replace(buckets=(max(task.buckets),))


class IntrinsicResult(NamedTuple):
    method: method_lib.Method
    delta: Any
    dev_logits: np.ndarray
    accuracy: float
    seconds: float
    losses: list[float]


def merged_accuracy(task: movies.Task, method: method_lib.Method, delta: Any
                    ) -> tuple[np.ndarray, float]:
    """Dev logits and accuracy of ``apply(merge(params, delta))`` with the merge done once (the
    projection then costs nothing per batch and is compiled once, not once per length bucket)."""
    merged = jax.jit(method.merge)(task.variables, delta)
    return movies.evaluate(task, None, merged, None)


def train_intrinsic(task: movies.Task, *, d: int, said: bool = True, steps: int, batch: int,
                    seed: int = 0, lr: float | None = None,
                    head_lr: float | None = DEFAULT_HEAD_LR, progress: bool = True,
                    log: Callable[[str], None] = print) -> IntrinsicResult:
    """Train ``build_method(d, said=said, seed=seed)`` for ``steps`` steps (``lr``: default
    :func:`default_lr`); dev accuracy of the merged model."""
    lr = default_lr(d) if lr is None else lr
    method = build_method(d, said=said, seed=seed)
    delta = method.init(jax.random.key(seed), task.variables, task.sites)
    log(f"{method.name}: d = {d} ({'SAID' if said else 'DID'}), "
        f"{tree_lib.param_report(task.variables, delta)}")
    result = movies.fine_tune(task, method, delta, steps=steps, batch=batch, lr=lr,
                              head_lr=head_lr, seed=seed, progress=progress)
    logits, acc = merged_accuracy(task, method, result.delta)
    log(f"d = {d}: dev accuracy {100 * acc:.2f}% after {steps} steps (batch {batch}, lr {lr:.3g}, head "
        f"lr {head_lr}); {result.seconds:.1f} s ({result.seconds / max(steps, 1):.3f} s/step)")
    return IntrinsicResult(method, result.delta, logits, acc, result.seconds, result.losses)


def run_intrinsic(task: movies.Task, *, d: int, said: bool = True, steps: int = 150,
                  batch: int = 16, seed: int = 0, progress: bool = True,
                  out: str | Path = "runs/intrinsic", lr: float | None = None,
                  head_lr: float | None = DEFAULT_HEAD_LR,
                  log: Callable[[str], None] = print) -> bool:
    """The demo (see the module docstring; batches padded to one length, :func:`single_shape`);
    returns whether every check held."""
    if steps < 1:
        raise ValueError(f"intrinsic_demo: steps must be >= 1, got {steps}")
    t0 = time.perf_counter()
    task = single_shape(task)
    log(f"intrinsic dimension on {task.model_dir.name}: {len(task.train)} train / {len(task.dev)} "
        f"dev sentences")
    _, head_only = movies.evaluate(task, None, task.variables, None)
    log(f"dev accuracy before fine-tuning (random head): {100 * head_only:.2f}%")
    res = train_intrinsic(task, d=d, said=said, steps=steps, batch=batch, seed=seed, lr=lr,
                          head_lr=head_lr, progress=progress, log=log)
    # The reload check compares the wrapped forward pass (projection inside the jitted predict).
    dev_logits, acc = movies.evaluate(task, res.method, task.variables, res.delta)
    part = res.method.config["compose"]["said" if said else "did"]
    if said:
        lam = np.asarray(res.delta["said"]["lambda"])
        log(f"SAID scalars after training: min {lam.min():.3f} max {lam.max():.3f}")
    log(f"wrapped forward: dev accuracy {100 * acc:.2f}%; seed {part['seed']}, d {part['d']}")
    ckpt_dir = Path(out).absolute() / "delta"
    ok = movies.check_save_reload_merge(
        task, res.method, res.delta, dev_logits, out, rebuild=lambda: rebuild_from_metadata(ckpt_dir),
        metadata={"method": "said" if said else "did", "d": d, "seed": seed}, log=log)
    log(f"total time {time.perf_counter() - t0:.1f} s")
    return ok
