"""The demo of every method preset on the embedded MiniLM, one table: dev accuracy, trainable %, time.

``python benchmarks/demos.py [--only houlsby,ia3,...] [--steps N] [--out PATH]`` runs
:func:`jpeft.recipes.finetune.run` (what ``jpeft demo --method NAME`` runs) for each preset, one
after the other in this process, with the preset's default options (``--steps`` overrides the
training length), and writes one JSON line per preset: dev accuracy before and after, the trainable
parameters of the main stage and their share of the base model, the training seconds per step of
every fitted stage, the total seconds, whether the recipe's reload/merge checks held, and the load
average before and after the run (a timing taken while the load is above the usable CPUs' share of
this process is not a timing result; accuracy and counts are deterministic given the seed).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import common

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "results" / "demos.jsonl"


def run_one(name: str, task, steps: int | None, batch: int) -> dict:
    from jpeft import presets
    from jpeft.core import tree as tree_lib
    from jpeft.recipes import finetune, movies

    lines = []

    def log(line: str) -> None:
        lines.append(line)
        print(f"  {line}", flush=True)

    preset = presets.get(name)
    options = {} if steps is None else {"steps": steps}
    options = presets.resolve(preset, options)
    env = movies.env(task, batch=batch, progress=False, log=log)
    load_before = common.loadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        outcome = finetune.run(preset, env, options, out=out)
    total = time.perf_counter() - t0
    state = outcome.state
    report = tree_lib.param_report(task.variables, state["delta"], state["method"])
    fits = [s for s in preset.stages(options) if isinstance(s, presets.Fit) and s.steps]
    return {
        "preset": name, "summary": preset.summary, "options": options,
        "dev_accuracy_before": outcome.before, "dev_accuracy_after": outcome.after,
        "trainable": report.trainable, "base": report.base,
        "trainable_percent": report.percent,
        "seconds_per_step": {s.name: state["seconds"][s.name] / s.steps for s in fits},
        "stage_seconds": state["seconds"], "total_seconds": total,
        "checks": outcome.checks, "ok": outcome.ok,
        "loadavg_before": load_before, "loadavg_after": common.loadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated presets (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (preset default)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    common.add_host_memory_flag(parser)
    args = parser.parse_args(argv)
    host_memory = common.host_memory(args)    # before the first JAX computation

    from jpeft import presets
    from jpeft.recipes import movies

    names = [n for n in args.only.split(",") if n] or list(presets.names())
    for n in names:
        presets.get(n)                       # an unknown name fails before anything runs
    task = movies.load_task(seq=args.seq)
    rows = [common.machine(kind="demos", host_memory=host_memory, batch=args.batch, seq=args.seq)]
    for name in names:
        print(f"== {name}", flush=True)
        row = run_one(name, task, args.steps, args.batch)
        print(f"== {name}: {100 * row['dev_accuracy_before']:.2f}% -> "
              f"{100 * row['dev_accuracy_after']:.2f}%, {row['trainable_percent']:.3f}% trainable, "
              f"{row['seconds_per_step']} s/step, ok {row['ok']}", flush=True)
        rows.append(row)
        common.write_jsonl(args.out, rows)   # what has run is kept if a later preset fails
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
