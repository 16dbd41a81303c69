"""Diff pruning and FishMask on the default task (MiniLM + movie-review sentiment).

Both train the classification head in full alongside (``full_finetune(("classifier",))``), keep
``density`` of the entries of every other tensor (22.6M entries of MiniLM; 0.5% = 113,066), store the
result sparse (indices + values per tensor, plus the head) and check that it reloads from disk to
identical predictions and that merging it into the base changes nothing.

* :func:`run_diff_pruning`: diff pruning with hard-concrete gates and the expected-L0 penalty;
  magnitude projection to ``density``; an optional re-fine-tune of the kept entries, mask fixed.
* :func:`run_fishmask`: the empirical Fisher over ``fisher_examples`` training examples, the
  global top ``density`` mask, then a fine-tune of the masked entries.

The sparse stages train in ``mode="materialised"`` by default (the faster form on a CPU, see
:mod:`jpeft.core.sparse`) and evaluate the merged model; the reload check runs the stored form
unmerged (factored), the merge check compares the two.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax

from jpeft.core import method as method_lib
from jpeft.core import sparse as sparse_lib
from jpeft.core import tree as tree_lib
from jpeft.methods import diff_pruning as dp
from jpeft.methods import fishmask as fm
from jpeft.methods.full import full_finetune
from jpeft.recipes import classification as clf
from jpeft.recipes import movies

HEAD = ("classifier",)


def _schedule(peak: float, steps: int):
    """10% linear warm-up, cosine decay (as :func:`jpeft.recipes.movies.make_optimizer`)."""
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 10), max(steps, 1))


def _head() -> method_lib.Method:
    return full_finetune(HEAD, name="head")


def sparse_method(indices: Any, *, fishmask: bool = False) -> method_lib.Method:
    """``compose(sparse=..., head=full_finetune(("classifier",)))`` training ``indices``."""
    part = fm.fishmask(indices, name="sparse") if fishmask else sparse_lib.sparse_finetune(indices)
    return method_lib.compose(sparse=part, head=_head())


def stored_method() -> method_lib.Method:
    """The composed method that runs a *stored* result ``{"sparse": {path: {indices, values}},
    "head": ...}`` as restored from a checkpoint."""
    return method_lib.compose(sparse=sparse_lib.stored_method(), head=_head())


def _evaluate(task: movies.Task, method: method_lib.Method, delta: Any):
    """Dev logits and accuracy of the merged model (equal to the unmerged forward pass, and the
    fastest form on a CPU)."""
    merged = jax.jit(lambda p, d: method.merge(p, d, task.sites))(task.variables, delta)
    return movies.evaluate(task, None, merged, None)


def _density_line(indices: Any, variables: Any) -> str:
    k = sparse_lib.num_entries(indices)
    total = tree_lib.num_params(variables)
    selected = total - tree_lib.num_params(variables["params"]["classifier"])
    return (f"kept {k:,} entries in {len(jax.tree.leaves(indices))} tensors: density "
            f"{100 * k / selected:.4f}% of the {selected:,} selected entries (all but the head), "
            f"{100 * k / total:.4f}% of all {total:,} base parameters")


def _save_and_check(task: movies.Task, indices: Any, values: Any, head: Any, trained_logits,
                    out: str | Path, log: Callable[[str], None], config: dict) -> bool:
    """Store ``{"sparse": to_stored(indices, values), "head": head}``; reload it from disk (shapes
    from the indices) and compare; merge and compare (:func:`movies.check_save_reload_merge`)."""
    stored = {"sparse": sparse_lib.to_stored(indices, values), "head": head}
    method = stored_method()
    logits, acc = movies.evaluate(task, method, task.variables, stored)
    log(f"stored form in memory: dev accuracy {100 * acc:.2f}%, max |logit diff| to the trained "
        f"model {np.abs(logits - trained_logits).max():.2e}")
    like = {"sparse": sparse_lib.stored_like(indices, task.variables),
            "head": jax.eval_shape(_head().init, jax.random.key(0), task.variables)}
    return movies.check_save_reload_merge(task, method, stored, logits, out, rebuild=stored_method,
                                          metadata=config, like=like, log=log)


def run_diff_pruning(task: movies.Task, *, steps: int, batch: int, seed: int, progress: bool,
                     out: str | Path, density: float = 0.005, refine_steps: int = 0,
                     lam: float = dp.LAMBDA, structured: bool = False, lr: float = 1e-4,
                     alpha_lr: float = 0.1, head_lr: float = 1e-2, refine_lr: float = 1e-3,
                     mode: str = "materialised", log: Callable[[str], None] = print) -> bool:
    """Diff pruning of every tensor but the head, projection to ``density``, optional re-fine-tune.

    Optimizers (Guo et al.'s set-up): AdamW on ``w`` (``lr``, warm-up + cosine) and on the head
    (``head_lr``), constant Adam with learning rate ``alpha_lr`` (the paper's 0.1) on the gate
    logits; loss = cross-entropy + ``lam * expected L0``. The re-fine-tune trains the kept values and
    the head for ``refine_steps`` steps with the mask fixed. Returns whether reload and merge
    reproduce the predictions.
    """
    t0 = time.perf_counter()
    method = method_lib.compose(
        diff_pruning=dp.diff_pruning(exclude=HEAD, structured=structured, lam=lam), head=_head())
    delta = method.init(jax.random.key(seed), task.variables, task.sites)
    log(f"diff pruning{' (structured)' if structured else ''}: w and gate logits alpha for every "
        f"entry but the head's; alpha_init {dp.ALPHA_INIT}, stretch (-1.5, 1.5), lambda {lam}")
    log(f"while learning the mask: {tree_lib.param_report(task.variables, delta)}")
    _, before = _evaluate(task, method, delta)
    log(f"dev accuracy before fine-tuning: {100 * before:.2f}%")

    labels = lambda d: {"diff_pruning": dp.labels(d["diff_pruning"]),     # "w" or "alpha"
                        "head": jax.tree.map(lambda _: "head", d["head"])}
    opt = optax.multi_transform(
        {"w": optax.adamw(_schedule(lr, steps), weight_decay=0.0), "alpha": optax.adam(alpha_lr),
         "head": optax.adamw(_schedule(head_lr, steps), weight_decay=0.0)}, labels)
    result = movies.fine_tune(task, method, delta, steps=steps, batch=batch, lr=lr, seed=seed,
                              progress=progress, optimizer=opt)
    delta = result.delta
    _, after = _evaluate(task, method, delta)
    gates = jax.tree.leaves(jax.jit(dp.gates)(delta["diff_pruning"]))
    n = sum(int(g.size) for g in gates)
    open_ = sum(int(np.count_nonzero(np.asarray(g))) for g in gates)
    log(f"after {steps} steps ({result.seconds:.1f} s, {result.seconds / max(steps, 1):.3f} s/step; "
        f"w lr {lr}, alpha lr {alpha_lr}, head lr {head_lr}): dev accuracy {100 * after:.2f}%; "
        f"expected L0 {float(dp.expected_l0(delta['diff_pruning'])):,.0f} of {n:,}, "
        f"deterministic gates open {open_:,}")

    proj = dp.project(delta["diff_pruning"], density)
    log(f"magnitude projection: {_density_line(proj.indices, task.variables)}")
    refine = sparse_method(proj.indices)
    rdelta = {"sparse": proj.values, "head": delta["head"]}
    logits, projected = _evaluate(task, refine, rdelta)
    log(f"dev accuracy after projection: {100 * projected:.2f}%")
    log(f"re-fine-tune (mask fixed): {tree_lib.param_report(task.variables, rdelta)}")
    if refine_steps:
        r = movies.fine_tune(task, refine, rdelta, steps=refine_steps, batch=batch, lr=refine_lr,
                             head_lr=head_lr, seed=seed + 1, progress=progress, mode=mode)
        rdelta = r.delta
        logits, acc = _evaluate(task, refine, rdelta)
        log(f"dev accuracy after {refine_steps} re-fine-tune steps ({r.seconds:.1f} s, lr "
            f"{refine_lr}): {100 * acc:.2f}% (base + head before: {100 * before:.2f}%, after diff "
            f"pruning {100 * after:.2f}%, projected {100 * projected:.2f}%)")
    ok = _save_and_check(task, proj.indices, rdelta["sparse"], rdelta["head"], logits, out, log,
                         {"method": "diff_pruning", "density": density, "config": method.config})
    log(f"total time {time.perf_counter() - t0:.1f} s")
    return ok


def fisher_examples_of(task: movies.Task, n: int, seed: int) -> dict[str, np.ndarray]:
    """The first ``n`` training examples of a seeded permutation (a fixed data order), cut to the
    smallest bucket that holds the longest of them, with their labels."""
    if n < 1:
        raise ValueError(f"fishmask: fisher_examples must be at least 1, got {n}")
    order = np.random.default_rng(seed).permutation(len(task.train))[:n]
    width = clf.bucket_length(task.train.inputs["attention_mask"][order].sum(1), task.buckets)
    ex = {k: v[order, :width] for k, v in task.train.inputs.items()}
    ex["labels"] = task.train.labels[order]
    return ex


def run_fishmask(task: movies.Task, *, steps: int, batch: int, seed: int, progress: bool,
                 out: str | Path, density: float = 0.005, fisher_examples: int = 256,
                 chunk_size: int = 8, lr: float = 1e-3, head_lr: float = 1e-2,
                 mode: str = "materialised", log: Callable[[str], None] = print) -> bool:
    """FishMask on every tensor but the head: Fisher over ``fisher_examples`` training examples
    (true labels, base model with its initial head, no dropout), top ``density`` mask, fine-tune
    of the masked entries and the head. Returns whether reload and merge reproduce the
    predictions."""
    t0 = time.perf_counter()
    examples = fisher_examples_of(task, fisher_examples, seed)
    model = task.model
    logprob = fm.label_log_likelihood(lambda p, ex: model.apply(
        p, ex["input_ids"][None], ex["attention_mask"][None], ex["token_type_ids"][None])[0])
    start = time.perf_counter()
    fisher = fm.fisher_information(logprob, task.variables, examples, chunk_size=chunk_size)
    jax.block_until_ready(fisher)
    log(f"empirical Fisher over {fisher_examples} training examples (length "
        f"{examples['input_ids'].shape[1]}, chunks of {chunk_size}): "
        f"{time.perf_counter() - start:.1f} s")
    indices = fm.fishmask_indices(fisher, density=density, exclude=HEAD)
    del fisher
    log(f"mask: {_density_line(indices, task.variables)}")
    method = sparse_method(indices, fishmask=True)
    delta = method.init(jax.random.key(seed), task.variables, task.sites)
    log(tree_lib.param_report(task.variables, delta))
    _, before = _evaluate(task, method, delta)
    log(f"dev accuracy before fine-tuning: {100 * before:.2f}%")
    result = movies.fine_tune(task, method, delta, steps=steps, batch=batch, lr=lr, head_lr=head_lr,
                              seed=seed, progress=progress, mode=mode)
    delta = result.delta
    logits, after = _evaluate(task, method, delta)
    log(f"dev accuracy after {steps} steps (batch {batch}, lr {lr}, head lr {head_lr}): "
        f"{100 * after:.2f}% (before: {100 * before:.2f}%); training took {result.seconds:.1f} s "
        f"({result.seconds / max(steps, 1):.3f} s/step)")
    ok = _save_and_check(task, indices, delta["sparse"], delta["head"], logits, out, log,
                         {"method": "fishmask", "density": density,
                          "fisher_examples": fisher_examples, "config": method.config})
    log(f"total time {time.perf_counter() - t0:.1f} s")
    return ok
