"""The results table: every method on six shipped text-classification tasks, three seeds each.

    python benchmarks/table.py            # the full table (about three hours on a 2-core CPU)
    python benchmarks/table.py --quick --out /tmp/table   # the CI smoke run (a minute or two)

For each task of :mod:`jpeft.data.tasks` (movie, tweet, Amazon and NYT snippets by rating sign,
SMS spam, TREC-6 questions; fixed seeded train/dev/test splits) and each method of :data:`METHODS`
(a :mod:`jpeft.presets` preset with options), on the embedded MiniLM with mean pooling and a fresh
linear head:

1. *learning rate*: the preset's learning rate times each factor of ``--grid``, seed 0; the factor
   with the best dev accuracy is kept (ties: the earlier factor; the grid and every dev accuracy are
   reported);
2. *seeds*: seeds 1 and 2 at that learning rate (the seed sets the initialisation and the data
   order; the splits stay fixed); test accuracy is reported as mean and standard deviation (ddof 0)
   over seeds 0-2.

Then per method, on the first task's shapes: trainable % of the model, the train step's FLOPs
(``cost_analysis``) and time relative to full fine-tuning, and inference time relative to the base
model (the method's factored forward; merged methods cost exactly the base). Times are measured
side by side in this one process: per method, ``--time-reps`` rounds each timing ``--time-steps``
calls of the method's step, its forward, full fine-tuning's step and the base model's forward in
turn; a ratio is the median of the per-round ratios (the load average is recorded). They are
ratios, not absolute figures. The low-data table (as in the UniPELT paper) trains ``--low-methods`` on ``K`` examples
drawn from each ``--low-tasks`` training set (seeds 0-2 draw different examples) at the learning
rate chosen above, and reports test accuracy.

Every training run is appended to ``<out>/table_runs.jsonl`` as it finishes; a restarted command
skips the runs already there (same settings only: a settings change is an error naming the file),
so an interrupted table resumes where it stopped. ``<out>/table.json`` and ``<out>/table.md`` are
written (atomically) from the runs at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any, NamedTuple

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax
import jax.numpy as jnp
import numpy as np

from common import loadavg, machine, write_jsonl  # noqa: E402

from jpeft import presets  # noqa: E402
from jpeft.core import train as train_lib  # noqa: E402
from jpeft.core import tree as tree_lib  # noqa: E402
from jpeft.data import tasks as tasks_lib  # noqa: E402
from jpeft.recipes import classification as clf  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class Row(NamedTuple):
    """A row of the table: ``preset`` with ``options`` over its defaults (before the budget's)."""
    name: str
    preset: str
    options: dict


#: The methods, in the table's order (the issue's list: selective, reparametrised, additive,
#: hybrid; UniPELT NoGate is UniPELT with its gates fixed open).
METHODS: tuple[Row, ...] = (
    Row("full", "full", {}),
    Row("head", "head", {}),
    Row("bitfit", "bitfit", {}),
    Row("diff-pruning", "diff-pruning", {}),
    Row("far", "far", {}),
    Row("fishmask", "fishmask", {}),
    Row("said", "said", {}),
    Row("lora", "lora", {}),
    Row("adalora", "adalora", {}),
    Row("houlsby", "houlsby", {}),
    Row("pfeiffer", "pfeiffer", {}),
    Row("parallel", "parallel", {}),
    Row("scaled-parallel", "scaled-parallel", {}),
    Row("compacter", "compacter", {}),
    Row("sparse-adapter", "sparse-adapter", {}),
    Row("ia3", "ia3", {}),
    Row("prefix", "prefix", {}),
    Row("prompt", "prompt", {}),
    Row("mam", "mam", {}),
    Row("unipelt", "unipelt", {}),
    Row("unipelt-nogate", "unipelt", {"gate": False}),
    Row("s4", "s4", {}),
)
ROWS = {r.name: r for r in METHODS}

#: The low-data table's methods (the UniPELT paper's: fine-tuning, BitFit, adapter, prefix, LoRA,
#: UniPELT).
LOW_METHODS = ("full", "bitfit", "houlsby", "prefix", "lora", "unipelt")


def budget_options(row: Row, steps: int) -> dict:
    """The options that size a method's stages to a ``steps``-step budget (the preset defaults
    are for the 250-step demo): FAR's warm-up and diff pruning's re-fine-tuning are a fifth of the
    budget, FishMask's Fisher pass uses 128 examples."""
    extra: dict[str, Any] = {}
    if row.preset == "far":
        extra["warmup_steps"] = max(1, steps // 5)
    if row.preset == "diff-pruning":
        extra["refine_steps"] = max(1, steps // 5)
    if row.preset == "fishmask":
        extra["fisher_examples"] = min(128, presets.get("fishmask").defaults["fisher_examples"])
    return {**extra, **row.options}


def base_lr(row: Row) -> float:
    """The preset's learning rate (SAID's from its dimension, :func:`jpeft.presets.intrinsic_lr`)."""
    preset = presets.get(row.preset)
    lr = {**preset.defaults, **row.options}["lr"]
    if lr is None:
        lr = presets.intrinsic_lr({**preset.defaults, **row.options}["d"])
    return float(lr)


# --------------------------------------------------------------------------------------------
# Tasks on the embedded model


class Loaded(NamedTuple):
    data: tasks_lib.TaskData
    splits: tasks_lib.Splits
    env: clf.ClassifierEnv
    test: clf.Split
    encode: Any


def load(name: str, args, model_cache: dict) -> Loaded:
    """Task ``name`` split and encoded, on MiniLM with a ``num_labels`` head (one shape:
    ``--seq`` tokens, so every run of a method reuses one compiled step)."""
    from jpeft.data.embedded import minilm_dir
    from jpeft.recipes import jobs
    data = tasks_lib.load(name)
    splits = tasks_lib.split(data, seed=0, test=args.test, dev=args.dev, train=args.train)
    key = data.num_labels
    if key not in model_cache:
        model_cache[key] = jobs.load_classifier(minilm_dir(), data.num_labels, "mean", args.seq)
    base = model_cache[key]
    enc = lambda part: clf.Split(base.encode(part.texts), part.labels.astype(np.int32))
    env = clf.ClassifierEnv(base.model.apply, base.variables, base.sites, enc(splits.train),
                            enc(splits.dev), batch=args.batch, buckets=None,
                            head=("classifier",), progress=False, log=lambda m: None,
                            eval_batch=args.eval_batch, model_record=base.record)
    return Loaded(data, splits, env, enc(splits.test), enc)


def with_train(loaded: Loaded, k: int, seed: int) -> clf.ClassifierEnv:
    """The environment on ``k`` training examples drawn with ``seed``
    (:func:`jpeft.data.tasks.subsample`)."""
    return loaded.env._replace(train=loaded.encode(tasks_lib.subsample(loaded.splits.train, k,
                                                                       seed)))


# --------------------------------------------------------------------------------------------
# Runs


def run_key(kind: str, task: str, method: str, factor: float, seed: int, k: int | None) -> str:
    return json.dumps([kind, task, method, factor, seed, k])


def train_once(row: Row, env: clf.ClassifierEnv, test: clf.Split, *, lr: float, seed: int,
               steps: int, dev: bool = True) -> dict:
    """One training run of ``row`` at ``lr`` and ``seed``: test accuracy, dev accuracy (``None``
    unless ``dev``: a run whose learning rate was chosen elsewhere needs none), seconds."""
    options = {**budget_options(row, steps), "steps": steps, "lr": lr, "seed": seed}
    t0 = time.perf_counter()
    state = presets.run_stages(row.preset, env, options)
    method, delta = state["method"], state["delta"]
    # One jitted forward for both splits (each make_predict traces and lowers again).
    predict = clf.make_predict(env.apply_fn, method, env.sites)
    accuracy = lambda split: clf.accuracy(clf.logits_of(predict, env.params, delta, split,
                                                        batch_size=env.eval_batch),
                                          split.labels)
    dev_acc = accuracy(env.dev) if dev else None
    test_acc = accuracy(test)
    report = tree_lib.param_report(env.params, delta, method)
    return {"dev_accuracy": dev_acc, "test_accuracy": test_acc,
            "seconds": time.perf_counter() - t0,
            "trainable": report.trainable, "base_params": report.base,
            "trainable_percent": report.percent,
            "options": presets.resolve(row.preset, options)}


#: The settings a run's result depends on, besides its key.
RUN_SETTINGS = ("steps", "batch", "seq", "train", "dev", "test")


class Runs:
    """``table_runs.jsonl``: one line per finished run, read back on a restart.

    Several processes may share the file (``--runs-only`` on different methods): each appends a
    record with one ``write`` and reads the file again when asked for a run it does not hold, so a
    run another process recorded is not run twice. A line that is not JSON is a record cut by a
    kill: it is skipped (its run runs again) and counted in ``dropped``; the file is never
    rewritten, so no other process's record can be lost.
    """

    def __init__(self, path: pathlib.Path, settings: dict):
        self.path = path
        self.done: dict[str, dict] = {}
        self.dropped = 0
        self.fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        *lines, tail = self.path.read_text(encoding="utf-8").split("\n")
        del tail                  # no newline yet: being written (or cut; the next add ends it)
        dropped = 0
        for line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if rec.get("settings") != self.fingerprint:
                raise ValueError(f"{self.path} holds runs made with other settings; delete it "
                                 f"(or pass another --out) to start afresh")
            self.done[rec["key"]] = rec
        self.dropped = dropped

    def get(self, key: str) -> dict | None:
        if key not in self.done:
            self._load()                 # another process may have recorded it since
        return self.done.get(key)

    def add(self, key: str, record: dict) -> dict:
        rec = {"key": key, "settings": self.fingerprint, **record}
        line = json.dumps(rec, default=str) + "\n"
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line        # end a record cut by a kill; it stays a bad line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = rec
        return rec


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def tune_task(args, task: str) -> str:
    """The task whose dev set picks the learning rate for ``task``."""
    return task if args.tune == "per-task" else args.tune


def grid_runs(args, runs: Runs, loaded: dict[str, Loaded], task: str, name: str) -> list[dict]:
    """Seed 0 at every factor of the grid on ``task`` (run, or read back)."""
    row, item, lr0, out = ROWS[name], loaded[task], base_lr(ROWS[name]), []
    for factor in args.grid:
        key = run_key("grid", task, name, factor, 0, None)
        rec = runs.get(key)
        if rec is None:
            rec = runs.add(key, {"kind": "grid", "task": task, "method": name, "factor": factor,
                                 "seed": 0, "lr": lr0 * factor,
                                 **train_once(row, item.env, item.test, lr=lr0 * factor, seed=0,
                                              steps=args.steps)})
            log(f"{task:7} {name:15} lr {rec['lr']:.2e} seed 0: dev {rec['dev_accuracy']:.4f} "
                f"test {rec['test_accuracy']:.4f} ({rec['seconds']:.1f} s)")
        out.append(rec)
    return out


def best_of(grid: list[dict]) -> dict:
    """The run with the best dev accuracy (the earlier factor among equals)."""
    return max(grid, key=lambda r: r["dev_accuracy"])


def accuracy_runs(args, runs: Runs, loaded: dict[str, Loaded]) -> None:
    """Per method: the learning-rate grid (seed 0) on the tuning task's dev set, then seeds
    0..``seeds``-1 on every task at the chosen rate (the grid's own run where it is one)."""
    for name in args.methods:
        row = ROWS[name]
        for task, item in loaded.items():
            best = best_of(grid_runs(args, runs, loaded, tune_task(args, task), name))
            for seed in range(args.seeds):
                if seed == 0 and tune_task(args, task) == task:
                    continue
                key = run_key("seed", task, name, best["factor"], seed, None)
                if runs.get(key) is not None:
                    continue
                rec = runs.add(key, {
                    "kind": "seed", "task": task, "method": name, "factor": best["factor"],
                    "seed": seed, "lr": best["lr"],
                    **train_once(row, item.env, item.test, lr=best["lr"], seed=seed,
                                 steps=args.steps, dev=tune_task(args, task) == task)})
                log(f"{task:7} {name:15} lr {rec['lr']:.2e} seed {seed}: "
                    f"test {rec['test_accuracy']:.4f} ({rec['seconds']:.1f} s)")


def chosen(args, runs: Runs, task: str, method: str) -> dict:
    """The seed-0 grid run with the best dev accuracy on ``task``'s tuning task."""
    tune = tune_task(args, task)
    by_factor = {r["factor"]: r for r in runs.done.values()
                 if r["kind"] == "grid" and r["task"] == tune and r["method"] == method}
    return best_of([by_factor[f] for f in args.grid])


def seed_runs(args, runs: Runs, task: str, name: str) -> list[dict]:
    """The runs behind a cell: seeds 0..``seeds``-1 at the chosen rate, by seed."""
    best = chosen(args, runs, task, name)
    found = {r["seed"]: r for r in runs.done.values() if r["kind"] == "seed"
             and r["task"] == task and r["method"] == name and r["factor"] == best["factor"]}
    if tune_task(args, task) == task:
        found[0] = best
    return [found[s] for s in range(args.seeds)]


def low_data_runs(args, runs: Runs, loaded: dict[str, Loaded]) -> None:
    for task in args.low_tasks:
        item = loaded[task]
        for name in args.low_methods:
            lr = chosen(args, runs, task, name)["lr"]
            for k in args.low_k:
                for seed in range(args.seeds):
                    key = run_key("low", task, name, lr, seed, k)
                    rec = runs.get(key) or runs.add(key, {
                        "kind": "low", "task": task, "method": name, "k": k, "seed": seed,
                        "lr": lr, **train_once(ROWS[name], with_train(item, k, seed), item.test,
                                               lr=lr, seed=seed, steps=args.steps, dev=False)})
                    log(f"{task:7} {name:15} K={k:5} seed {seed}: test "
                        f"{rec['test_accuracy']:.4f}")


# --------------------------------------------------------------------------------------------
# Cost: FLOPs and time relative to full fine-tuning, inference relative to the base


def _alternated(fns: dict, reps: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns``: ``reps`` rounds, each timing ``calls`` calls of every
    function in turn (so a slow spell of the machine falls on all of them alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready([fn() for _ in range(calls)])
            times[k].append((time.perf_counter() - t0) / calls)
    return times


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over rounds of ``a``'s time over ``b``'s in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def cost_rows(args, env: clf.ClassifierEnv) -> dict[str, dict]:
    """Per method: train-step FLOPs, and its step and inference timed side by side with full
    fine-tuning's step and the base model's inference on one training batch of ``env`` (rounds
    alternated, :func:`_alternated`); the ratios are the medians of the per-round ratios."""
    batch = next(clf.batches(env.train, args.batch, seed=0))
    ex = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    plain = clf.make_predict(env.apply_fn, None, env.sites)
    base_fn = lambda: plain(env.params, None, ex)
    base_fn()
    full_fn = None
    out = {}
    # Full fine-tuning first: every other step is timed beside its step.
    for name in sorted(args.methods, key=lambda n: n != "full"):
        row = ROWS[name]
        preset = presets.get(row.preset)
        # Every stage for one step (the stages before the main fit as short as they go, for the
        # data they compute: FAR's columns, sparse indices); the main fit's method and delta are
        # kept: its step's shapes and FLOPs do not depend on how long anything trained.
        options = {**budget_options(row, args.steps), **_one_step(row.preset), "steps": 1,
                   "seed": 0}
        main = presets.main_stage(preset, options)
        kept: dict = {}
        # A copy: the stages after the main fit (diff pruning's re-fine-tune) donate its delta.
        presets.run_stages(preset, env, options,
                           after=lambda stage, st: kept.update(
                               st, delta=jax.tree.map(jnp.copy, st["delta"]))
                           if stage.name == main.name else None)
        method, delta = kept["method"], kept["delta"]
        opt = (main.optimizer(method) if main.optimizer is not None else
               presets.default_optimizer(method, main.steps, main.lr or 1e-3, main.head_lr))
        loss_fn = clf.make_loss(env.apply_fn, method, env.sites, mode=main.mode)
        step = train_lib.make_train_step(loss_fn, opt, method=method, donate=False)
        opt_state = train_lib.init_opt_state(opt, delta, method=method)
        key = jax.random.key(0)
        compiled = step.lower(env.params, delta, opt_state, batch, key).compile()
        flops = (compiled.cost_analysis() or {}).get("flops")
        step_fn = (lambda step=step, delta=delta, opt_state=opt_state:
                   step(env.params, delta, opt_state, batch, key))
        predict = clf.make_predict(env.apply_fn, method, env.sites)
        predict_fn = lambda predict=predict, delta=delta: predict(env.params, delta, ex)
        step_fn(), predict_fn()                                  # warm
        fns = {"step": step_fn, "predict": predict_fn, "base": base_fn}
        if full_fn is not None:
            fns["full"] = full_fn
        times = _alternated(fns, args.time_reps, args.time_steps)
        if name == "full":
            full_fn = step_fn
        report = tree_lib.param_report(env.params, delta, method)
        out[name] = {"flops": flops, "step_seconds": statistics.median(times["step"]),
                     "inference_seconds": statistics.median(times["predict"]),
                     "base_inference_seconds": statistics.median(times["base"]),
                     "step_time_vs_full": (1.0 if name == "full" else
                                           _ratio(times, "step", "full") if "full" in times
                                           else None),
                     "inference_time_vs_base": _ratio(times, "predict", "base"),
                     "trainable": report.trainable, "trainable_percent": report.percent,
                     "mergeable": method.merge is not None, "loadavg": loadavg()}
        log(f"cost {name:15} {report.percent:8.4f}% trainable, {flops:.3g} FLOPs, "
            f"{1e3 * out[name]['step_seconds']:.1f} ms/step "
            f"({out[name]['step_time_vs_full'] or float('nan'):.2f} x full), "
            f"{1e3 * out[name]['inference_seconds']:.1f} ms/inference "
            f"({out[name]['inference_time_vs_base']:.2f} x base)")
    return {name: out[name] for name in args.methods}


def _one_step(preset: str) -> dict:
    """Options that make the stages around the main fit as short as they go."""
    defaults = presets.get(preset).defaults
    short = {k: 1 for k in ("warmup_steps", "refine_steps") if k in defaults}
    if "fisher_examples" in defaults:
        short["fisher_examples"] = 8
    return short


# --------------------------------------------------------------------------------------------
# The table


def mean_std(xs: list[float]) -> tuple[float, float]:
    return float(np.mean(xs)), float(np.std(xs))


def summarise(args, runs: Runs, costs: dict, settings: dict) -> dict:
    rows = []
    for name in args.methods:
        per_task = {}
        for task in args.tasks:
            best = chosen(args, runs, task, name)
            accs = [100 * r["test_accuracy"] for r in seed_runs(args, runs, task, name)]
            tune = tune_task(args, task)
            grid = {f"{r['lr']:.3g}": round(100 * r["dev_accuracy"], 2)
                    for r in runs.done.values()
                    if r["kind"] == "grid" and r["task"] == tune and r["method"] == name}
            mean, std = mean_std(accs)
            per_task[task] = {"test_mean": mean, "test_std": std, "test_runs": accs,
                              "lr": best["lr"], "dev_grid": grid}
        c = costs.get(name, {})
        full = costs.get("full", {})
        ratio = lambda a, b: (a / b) if (a is not None and b) else None
        rows.append({
            "method": name, "preset": ROWS[name].preset, "options": ROWS[name].options,
            "trainable_percent": c.get("trainable_percent"), "trainable": c.get("trainable"),
            "tasks": per_task,
            "accuracy": float(np.mean([t["test_mean"] for t in per_task.values()])),
            "flops_vs_full": ratio(c.get("flops"), full.get("flops")),
            "step_time_vs_full": c.get("step_time_vs_full"),
            "inference_time_vs_base": c.get("inference_time_vs_base"),
            "mergeable": c.get("mergeable")})
    low = []
    for task in args.low_tasks:
        for name in args.low_methods:
            for k in args.low_k:
                accs = [100 * r["test_accuracy"] for r in runs.done.values()
                        if r["kind"] == "low" and r["task"] == task and r["method"] == name
                        and r["k"] == k]
                mean, std = mean_std(accs)
                low.append({"task": task, "method": name, "k": k, "test_mean": mean,
                            "test_std": std, "test_runs": accs})
    return {"settings": settings, "rows": rows, "low_data": low, "costs": costs,
            "machine": machine()}


def summary_markdown(table: dict) -> str:
    """The short table of the README: per method, trainable %, mean test accuracy over the tasks
    (± the seeds' standard deviation averaged over the tasks), the best and worst task, FLOPs and
    step time relative to full fine-tuning."""
    f = lambda x: "–" if x is None else f"{x:.2f}"
    lines = ["| method | trainable % | mean test accuracy % | FLOPs / full | step time / full |",
             "|---|---:|---:|---:|---:|"]
    for r in table["rows"]:
        std = float(np.mean([c["test_std"] for c in r["tasks"].values()]))
        pct = r["trainable_percent"]
        lines.append(f"| {r['method']} | {'–' if pct is None else f'{pct:.3g}'} | "
                     f"{r['accuracy']:.1f} ± {std:.1f} | {f(r['flops_vs_full'])} | "
                     f"{f(r['step_time_vs_full'])} |")
    return "\n".join(lines) + "\n"


def markdown(table: dict) -> str:
    s = table["settings"]
    tasks = s["tasks"]
    lines = [
        "# Results table",
        "",
        f"Generated by `{s['command']}`. MiniLM-L6 (mean pooling, a fresh linear head), "
        f"{s['steps']} steps of batch {s['batch']} at {s['seq']} tokens; training sets of at "
        f"most {s['train']} examples, dev {s['dev']}, test {s['test']} (fixed seeded splits, "
        f"`jpeft.data.tasks`). Learning rate: the preset's times the factor of "
        f"{s['grid']} with the best dev accuracy (seed 0) on "
        f"{'each task' if s['tune'] == 'per-task' else 'the ' + s['tune'] + ' task'}; "
        f"test accuracy % as mean ± std over seeds "
        f"{list(range(s['seeds']))}. FLOPs (`cost_analysis`) and step time relative to full "
        f"fine-tuning, inference time relative to the base model (factored forward), measured "
        f"on one batch of `{tasks[0]}` in one process, each method's step and forward timed in "
        f"alternated rounds beside full fine-tuning's step and the base's forward (load "
        f"average before the timings: {s.get('loadavg_before_costs')}).",
        "",
        "| method | trainable % | " + " | ".join(tasks) + " | mean | FLOPs/full | time/full "
        "| inference/base |",
        "|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|---:|",
    ]
    f = lambda x, d=2: "–" if x is None else f"{x:.{d}f}"
    for r in table["rows"]:
        cells = [f"{r['tasks'][t]['test_mean']:.1f} ± {r['tasks'][t]['test_std']:.1f}"
                 for t in tasks]
        pct = r["trainable_percent"]
        lines.append(f"| {r['method']} | {'–' if pct is None else f'{pct:.3g}'} | "
                     + " | ".join(cells) + f" | {r['accuracy']:.1f} | {f(r['flops_vs_full'])} | "
                     f"{f(r['step_time_vs_full'])} | {f(r['inference_time_vs_base'])} |")
    lines += ["", "Learning rate chosen on dev (seed 0), per task:", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for r in table["rows"]:
        lines.append(f"| {r['method']} | " + " | ".join(f"{r['tasks'][t]['lr']:.2g}"
                                                        for t in tasks) + " |")
    if table["low_data"]:
        ks = sorted({r["k"] for r in table["low_data"]})
        lines += ["", f"Low data: test accuracy % (mean ± std over {s['seeds']} seeds, each "
                      f"drawing its own K training examples), learning rate as chosen above.", "",
                  "| task | method | " + " | ".join(f"K={k}" for k in ks) + " |",
                  "|---|---|" + "---:|" * len(ks)]
        cell = {(r["task"], r["method"], r["k"]): r for r in table["low_data"]}
        for task in s["low_tasks"]:
            for m in s["low_methods"]:
                lines.append(f"| {task} | {m} | " + " | ".join(
                    f"{cell[(task, m, k)]['test_mean']:.1f} ± {cell[(task, m, k)]['test_std']:.1f}"
                    for k in ks) + " |")
    return "\n".join(lines) + "\n"


def write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the CI smoke settings: 2 tasks, 3 methods, tiny splits and budgets")
    p.add_argument("--tasks", default=",".join(tasks_lib.TASKS))
    p.add_argument("--methods", default=",".join(r.name for r in METHODS))
    p.add_argument("--low-methods", default=",".join(LOW_METHODS))
    p.add_argument("--low-tasks", default="movies")
    p.add_argument("--low-k", default="100,500,1000")
    p.add_argument("--grid", default="0.5,1,2", help="learning-rate factors tried on dev")
    p.add_argument("--tune", default="movies",
                   help="the task whose dev set picks each method's learning rate for every "
                        "task, or 'per-task' (a grid on each task's own dev set)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=40)
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--dev", type=int, default=300)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--eval-batch", type=int, default=200)
    p.add_argument("--time-steps", type=int, default=5)
    p.add_argument("--time-reps", type=int, default=3)
    p.add_argument("--runs-only", action="store_true",
                   help="train and record the runs, write no table (to split a table over "
                        "processes: each takes some --methods, then one command with all of "
                        "them writes the table from the recorded runs)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--jax-cache", default=os.path.join(tempfile.gettempdir(),
                                                       "jpeft-table-jax-cache"),
                   help="JAX's persistent compilation cache: the runs of a method that share a "
                        "learning rate and a label count compile once ('' to turn it off)")
    args = p.parse_args(argv)
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        quick = {"--tasks": "movies,trec", "--methods": "full,head,lora",
                 "--low-methods": "lora", "--low-tasks": "movies", "--low-k": "16",
                 "--grid": "1,2", "--seeds": 2, "--steps": 4, "--batch": 8, "--seq": 24,
                 "--train": 64, "--dev": 32, "--test": 32, "--eval-batch": 32,
                 "--time-steps": 1, "--time-reps": 1}
        for flag, value in quick.items():
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    split = lambda s: [x for x in s.split(",") if x]
    args.tasks, args.methods = split(args.tasks), split(args.methods)
    args.low_methods, args.low_tasks = split(args.low_methods), split(args.low_tasks)
    args.low_k = [int(k) for k in split(args.low_k)]
    args.grid = [float(x) for x in split(args.grid)]
    for t in args.tasks + args.low_tasks:
        if t not in tasks_lib.TASKS:
            p.error(f"unknown task {t!r}; choose from {', '.join(tasks_lib.TASKS)}")
    if args.tune != "per-task" and args.tune not in args.tasks:
        p.error(f"--tune: {args.tune!r} is neither 'per-task' nor one of --tasks")
    for m in args.methods:
        if m not in ROWS:
            p.error(f"unknown method {m!r}; choose from {', '.join(ROWS)}")
    for m in args.low_methods:
        if m not in args.methods:
            p.error(f"--low-methods: {m!r} is not among --methods (its learning rate is chosen "
                    f"there)")
    for t in args.low_tasks:
        if t not in args.tasks:
            p.error(f"--low-tasks: {t!r} is not among --tasks")
    for flag in ("seeds", "steps", "batch", "seq", "train", "dev", "test", "eval_batch",
                 "time_steps", "time_reps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.grid or any(g <= 0 for g in args.grid):
        p.error("--grid: positive factors, comma-separated")
    if any(k < args.batch or k > args.train for k in args.low_k):
        p.error(f"--low-k: each K must lie in [--batch {args.batch}, --train {args.train}]")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.jax_cache:
        # The same executable is loaded instead of compiled again: results are unchanged.
        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("tasks", "methods", "low_methods", "low_tasks", "low_k", "grid", "tune", "seeds",
            "steps", "batch", "seq", "train", "dev", "test")
    settings = {k: getattr(args, k) for k in keys}
    # What a run's result depends on besides its key (task, method, factor, seed, K): the runs of
    # commands that differ only in which tasks and methods they cover share one file (a table
    # can be split over processes: --runs-only).
    runs = Runs(out / "table_runs.jsonl", {k: settings[k] for k in RUN_SETTINGS})
    t0 = time.perf_counter()
    cache: dict = {}
    loaded = {t: load(t, args, cache) for t in args.tasks}
    for t, item in loaded.items():
        log(f"task {t}: {len(item.data)} examples, {item.data.num_labels} classes; "
            f"train {len(item.env.train)}, dev {len(item.env.dev)}, test {len(item.test)}")
    log(f"{len(runs.done)} runs already in {runs.path}")
    accuracy_runs(args, runs, loaded)
    low_data_runs(args, runs, loaded)
    if args.runs_only:
        log(f"{len(runs.done)} runs in {runs.path}; no table written (--runs-only)")
        return {}
    loadavg_before_costs = loadavg()
    costs = cost_rows(args, loaded[args.tasks[0]].env)
    command = "python benchmarks/table.py" + ("" if argv is None and len(sys.argv) == 1 else
                                              " " + " ".join(argv if argv is not None
                                                             else sys.argv[1:]))
    table = summarise(args, runs, costs, {**settings, "command": command,
                                          "loadavg_before_costs": loadavg_before_costs,
                                          "seconds": time.perf_counter() - t0,
                                          "run_seconds": sum(r["seconds"]
                                                             for r in runs.done.values())})
    write_text(out / "table.json", json.dumps(table, indent=1, default=str) + "\n")
    write_text(out / "table.md", markdown(table))
    log(f"wrote {out / 'table.json'} and {out / 'table.md'} "
        f"({time.perf_counter() - t0:.0f} s)")
    return table


if __name__ == "__main__":
    main()
