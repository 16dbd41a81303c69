"""FAR on the default task (MiniLM + movie-review sentiment): score, select, train, check.

1. Score the output columns of the feed-forward matrices: by their L1 change over a short warm-up
   fine-tune of those matrices and the head (``score="change"``, the paper), or by their L1 norm
   (``score="magnitude"``, no warm-up).
2. Keep ``fraction`` of the columns of each matrix; train them (and their bias entries) with the
   classification head, starting again from the base model (the warm-up only ranks columns).
3. Report trainable counts and densities, dev accuracy before and after, time; check that the
   saved delta reloads to identical predictions and that merging changes nothing; and that the
   stored form (indices + kept columns) restores from disk alone to the same predictions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jpeft import checkpoint
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import tree as tree_lib
from jpeft.methods import far as far_lib
from jpeft.methods.full import full_finetune
from jpeft.recipes import movies

SCORES = ("change", "magnitude")


def build_method(columns, *, train_bias: bool = True) -> method_lib.Method:
    """``compose(far=far(columns), head=full_finetune(("classifier",)))``."""
    return method_lib.compose(far=far_lib.far(columns, train_bias=train_bias),
                              head=full_finetune(("classifier",), name="head"))


def score_columns(task: movies.Task, *, score: str, targets=far_lib.BERT_FFN, warmup_steps: int,
                  batch: int, lr: float, head_lr: float | None, seed: int, progress: bool,
                  log: Callable[[str], None] = print):
    """Stage 1: ``{kernel path: s [out]}`` for the targeted matrices, and the seconds it took."""
    if score not in SCORES:
        raise ValueError(f"far_demo: score must be one of {SCORES}, got {score!r}")
    start = time.perf_counter()
    if score == "magnitude":
        return far_lib.far_magnitude_scores(task.variables, targets), time.perf_counter() - start
    if warmup_steps < 1:
        raise ValueError(f"far_demo: score='change' needs warmup_steps >= 1, got {warmup_steps}")
    warm = method_lib.compose(ffn=full_finetune(targets, name="ffn"),
                              head=full_finetune(("classifier",), name="head"))
    delta = warm.init(jax.random.key(seed), task.variables, task.sites)
    log(f"warm-up: {warmup_steps} steps of full fine-tuning of the targeted matrices "
        f"({tree_lib.num_params(delta['ffn']):,} parameters) and the head, lr {lr}")
    result = movies.fine_tune(task, warm, delta, steps=warmup_steps, batch=batch, lr=lr,
                              head_lr=head_lr, seed=seed, progress=progress)
    scores = far_lib.far_scores(task.variables, result.delta["ffn"], targets, warm_is_delta=True)
    return scores, time.perf_counter() - start


def check_stored_form(task: movies.Task, columns, delta, dev_logits: np.ndarray, out: str | Path,
                      log: Callable[[str], None] = print) -> bool:
    """Save ``{"far": far_pack(columns, delta["far"]), "head": delta["head"]}``; restore it with a
    template read from the checkpoint; rebuild the method from the restored indices and compare the
    dev predictions bit for bit."""
    stored = {"far": far_lib.far_pack(columns, delta["far"]), "head": delta["head"]}
    ckpt = checkpoint.save(Path(out).absolute() / "far_stored", stored, overwrite=True)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    restored = checkpoint.restore(ckpt, checkpoint.stored_like(ckpt))["delta"]
    cols2, far_delta = far_lib.far_unpack(restored["far"])
    same_cols = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(cols2),
                                                          jax.tree.leaves(columns)))
    logits, _ = movies.evaluate(task, build_method(cols2), task.variables,
                                {"far": far_delta, "head": restored["head"]})
    same = same_cols and bool(np.array_equal(logits, dev_logits))
    log(f"stored form (indices + kept columns + head, {size / 1e6:.2f} MB) restored from disk "
        f"alone: same indices {same_cols}, predictions identical {same}")
    return same


def run_far(task: movies.Task, *, steps: int, batch: int, seed: int = 0, progress: bool = True,
            out: str | Path = "runs/far", fraction: float = 0.2, warmup_steps: int = 20,
            score: str = "change", budget: str = "per_matrix", lr: float = 1e-3,
            warmup_lr: float = 5e-5, head_lr: float | None = 1e-2,
            targets=far_lib.BERT_FFN, log: Callable[[str], None] = print) -> bool:
    """FAR on ``task`` (see the module docstring); returns whether every check held.

    ``fraction=0.2`` of the feed-forward columns is about 6% of MiniLM's parameters, the share the
    paper reports for its runs.
    """
    t0 = time.perf_counter()
    log(f"FAR on {task.model_dir.name}: {len(task.train)} train / {len(task.dev)} dev sentences; "
        f"score={score}, fraction={fraction}, budget={budget}")
    scores, score_s = score_columns(task, score=score, targets=targets, warmup_steps=warmup_steps,
                                    batch=batch, lr=warmup_lr, head_lr=head_lr, seed=seed,
                                    progress=progress, log=log)
    columns = far_lib.far_select(scores, fraction, budget=budget)
    log(f"scored {len(paths_lib.flatten(scores))} matrices in {score_s:.1f} s")

    method = build_method(columns)
    delta = method.init(jax.random.key(seed), task.variables, task.sites)
    report = far_lib.far_report(task.variables, columns)
    model_report = tree_lib.param_report(task.variables, delta)
    log(str(report))
    log(f"whole model (FAR + head): {model_report}; FAR alone is "
        f"{100 * report.trainable / model_report.base:.4f}% of the model")

    _, before = movies.evaluate(task, method, task.variables, delta)
    log(f"dev accuracy before fine-tuning: {100 * before:.2f}%")
    result = movies.fine_tune(task, method, delta, steps=steps, batch=batch, lr=lr,
                              head_lr=head_lr, seed=seed, progress=progress)
    delta = result.delta
    dev_logits, after = movies.evaluate(task, method, task.variables, delta)
    log(f"dev accuracy after {steps} FAR steps (batch {batch}, lr {lr}, head lr {head_lr}): "
        f"{100 * after:.2f}% (before: {100 * before:.2f}%); training took {result.seconds:.1f} s "
        f"({result.seconds / max(steps, 1):.3f} s/step), scoring {score_s:.1f} s")

    rebuild = lambda: build_method(columns)
    like = jax.eval_shape(lambda k, p: rebuild().init(k, p, task.sites), jax.random.key(0),
                          task.variables)
    ok = movies.check_save_reload_merge(task, method, delta, dev_logits, out, rebuild=rebuild,
                                        like=like, log=log,
                                        metadata={"method": "far", "fraction": fraction,
                                                  "score": score, "budget": budget})
    ok = check_stored_form(task, columns, delta, dev_logits, out, log=log) and ok
    log(f"total time {time.perf_counter() - t0:.1f} s")
    return ok
