"""Intrinsic-dimension sweep on the default task: dev accuracy against d, as a fraction of full
fine-tuning (the d90 idea of Aghajanyan et al., 2020: the smallest d that reaches 90% of it).

Every configuration fine-tunes the embedded MiniLM (all-MiniLM-L6-v2, mean pooling, 2-way head) on
the movie-review sentences with the same step budget, batch and data order:

* ``head``: only the classification head (770 parameters), the floor every run below starts from;
* ``full``: full fine-tuning (``jpeft.full_finetune()``, AdamW, lower learning rate);
* ``said_d<d>`` for each ``d``: SAID (:func:`jpeft.methods.intrinsic.said`) on every weight except
  the head (22.6M entries, embeddings included, as in the paper), the head trained directly
  beside it; Adam peak learning rate ``lr_scale / sqrt(d)`` (a unit of ``theta_d`` moves every
  tensor by about unit norm, so the total step grows like ``sqrt(d)``; tuned a little on d = 100,
  1000 and 10000) and ``--head-lr`` for the head.

The optimizer is AdamW without weight decay, 10% warm-up and cosine decay
(``jpeft.recipes.movies.make_optimizer``); batches are padded to one length (``--seq``, longer
sentences truncated) so the step compiles once. Accuracy is that of the merged model on the dev
split (``--dev-limit`` to shorten it).

Usage::

    python benchmarks/intrinsic_sweep.py                       # d in 10, 100, 1000, 10000
    python benchmarks/intrinsic_sweep.py --ds 10,1000 --steps 20 --dev-limit 200

Results: ``benchmarks/results/intrinsic_sweep.jsonl``, rewritten (temporary file + rename) after
every configuration, one JSON object per line: ``kind: "run"`` rows (``config``, ``d``,
``trainable_params``, ``lr``, ``dev_accuracy``, ``ratio_to_full``, ``gap_closed`` =
``(acc - acc_head) / (acc_full - acc_head)``, losses, seconds) and a ``kind: "summary"`` row
(``d90``: the smallest swept d with ``ratio_to_full >= 0.9``, or null), each with ``setup`` and
``machine``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jpeft  # noqa: E402
import common  # noqa: E402  (benchmarks/common.py)
from common import write_jsonl  # noqa: E402  (benchmarks/common.py)
from jpeft.core import method as method_lib  # noqa: E402
from jpeft.methods.full import full_finetune  # noqa: E402
from jpeft import presets  # noqa: E402
from jpeft.recipes import movies  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "intrinsic_sweep.jsonl"


def _machine() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__, "optax_version": optax.__version__,
        "jpeft_version": jpeft.__version__, "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(), "python": platform.python_version(),
    }


def _run(task: movies.Task, name: str, method: method_lib.Method, *, d: int | None, lr: float,
         head_lr: float | None, steps: int, batch: int, seed: int) -> dict[str, Any]:
    delta = method.init(jax.random.key(seed), task.variables, task.sites)
    t0 = time.perf_counter()
    result = movies.fine_tune(task, method, delta, steps=steps, batch=batch, lr=lr,
                              head_lr=head_lr, seed=seed, progress=False)
    _, acc = movies.merged_accuracy(task, method, result.delta)
    row = {"kind": "run", "config": name, "d": d, "method_config": method.config,
           "trainable_params": jpeft.num_params(delta), "lr": lr, "head_lr": head_lr,
           "steps": steps, "batch": batch, "dev_accuracy": acc,
           "loss_first10": float(np.mean(result.losses[:10])),
           "loss_last10": float(np.mean(result.losses[-10:])),
           "train_seconds_incl_compile": result.seconds,
           "seconds_incl_eval": time.perf_counter() - t0}
    if "said" in method.config.get("compose", {}):
        lam = np.asarray(result.delta["said"]["lambda"])
        row["said_lambda_min"], row["said_lambda_max"] = float(lam.min()), float(lam.max())
    print(f"[{name}] dev accuracy {100 * acc:.2f}%  ({row['trainable_params']:,} trainable, lr "
          f"{lr:g}, loss {row['loss_first10']:.3f} -> {row['loss_last10']:.3f}, "
          f"{row['seconds_incl_eval']:.0f} s)", flush=True)
    return row


def _finish(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios to full fine-tuning and gap closed over the head-only floor; the summary row."""
    by = {r["config"]: r for r in rows if r["kind"] == "run"}
    full, head = by.get("full"), by.get("head")
    for r in by.values():
        if full:
            r["ratio_to_full"] = r["dev_accuracy"] / full["dev_accuracy"]
        if full and head and full["dev_accuracy"] != head["dev_accuracy"]:
            r["gap_closed"] = ((r["dev_accuracy"] - head["dev_accuracy"])
                               / (full["dev_accuracy"] - head["dev_accuracy"]))
    swept = sorted((r for r in by.values() if r["d"] is not None), key=lambda r: r["d"])
    reach = [r["d"] for r in swept if r.get("ratio_to_full", 0.0) >= 0.9]
    return {"kind": "summary", "d90": reach[0] if reach else None,
            "full_accuracy": full and full["dev_accuracy"],
            "head_only_accuracy": head and head["dev_accuracy"],
            "head_only_ratio_to_full": head and head.get("ratio_to_full"),
            "note": "d90 = smallest swept d whose SAID dev accuracy is >= 0.9 x full fine-tuning's; "
                    "the head is trained directly in every run, so compare with head_only too "
                    "(gap_closed)"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds", default="10,100,1000,10000", help="comma-separated d values")
    p.add_argument("--steps", type=int, default=50, help="train steps per configuration (50)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=48, help="padded length (48: 3.6%% of sentences cut)")
    p.add_argument("--dev-limit", type=int, default=0, help="first N dev sentences (0: all)")
    p.add_argument("--lr-scale", type=float, default=0.03, help="SAID lr = lr_scale / sqrt(d)")
    p.add_argument("--full-lr", type=float, default=1e-4)
    p.add_argument("--head-lr", type=float, default=1e-2)
    p.add_argument("--did", action="store_true", help="DID instead of SAID")
    p.add_argument("--no-baselines", action="store_true", help="skip head-only and full runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    host_memory = common.host_memory(args)    # before the first JAX computation
    ds = [int(x) for x in args.ds.split(",") if x.strip()]
    if args.steps < 1 or any(d < 1 for d in ds):
        p.error("--steps and every d must be >= 1")

    t0 = time.perf_counter()
    task = movies.single_shape(
        movies.load_task(seq=args.seq, seed=args.seed, dev_limit=args.dev_limit))
    kind = "did" if args.did else "said"
    setup = {"model": "all-MiniLM-L6-v2 (embedded), mean pooling, 2 labels",
             "data": f"movie-review sentences: {len(task.train)} train / {len(task.dev)} dev",
             "seq": args.seq, "batch": args.batch, "steps": args.steps, "seed": args.seed,
             "method": f"compose({kind}=intrinsic.{kind}(d, exclude=('classifier',)), "
                       "head=full_finetune(('classifier',)))",
             "optimizer": "adamw(weight_decay=0), 10% linear warm-up, cosine decay",
             "lr_rule": f"{args.lr_scale} / sqrt(d)", "full_lr": args.full_lr,
             "head_lr": args.head_lr, "base_params": jpeft.num_params(task.variables)}
    machine = {**_machine(), "host_memory": host_memory}
    out = pathlib.Path(args.out)
    print(f"intrinsic sweep: d in {ds}, {args.steps} steps x batch {args.batch}, {setup['data']}; "
          f"{machine['backend']}, {machine['cpus_usable']} cpus", flush=True)

    rows: list[dict[str, Any]] = []

    def record(row):
        rows.append({**row, "setup": setup, "machine": machine})
        write_jsonl(out, rows + [{**_finish(rows), "setup": setup, "machine": machine}])

    shared = dict(steps=args.steps, batch=args.batch, seed=args.seed)
    if not args.no_baselines:
        head = method_lib.compose(head=full_finetune(("classifier",), name="head"))
        record(_run(task, "head", head, d=None, lr=args.head_lr, head_lr=args.head_lr, **shared))
        record(_run(task, "full", jpeft.full_finetune(), d=None, lr=args.full_lr, head_lr=None,
                    **shared))
    for d in ds:
        method = presets.main_stage(kind, {"d": d, "seed": args.seed}).method(
            {"head": ("classifier",)})
        record(_run(task, f"{kind}_d{d}", method, d=d, lr=args.lr_scale / math.sqrt(d),
                    head_lr=args.head_lr, **shared))

    summary = _finish(rows)
    write_jsonl(out, rows + [{**summary, "setup": setup, "machine": machine}])
    print(f"\n{'config':<14} {'trainable':>11} {'lr':>9} {'dev acc':>8} {'x full':>7} "
          f"{'gap closed':>10} {'s':>6}")
    for r in rows:
        fmt = lambda k, spec: "-" if r.get(k) is None else format(r[k], spec)
        print(f"{r['config']:<14} {r['trainable_params']:>11,} {r['lr']:>9.2e} "
              f"{100 * r['dev_accuracy']:>7.2f}% {fmt('ratio_to_full', '7.3f'):>7} "
              f"{fmt('gap_closed', '10.3f'):>10} {r['seconds_incl_eval']:>6.0f}")
    print(f"d90 (smallest swept d with >= 0.9 x full): {summary['d90']}; head alone reaches "
          f"{summary['head_only_ratio_to_full']} of full. Total {time.perf_counter() - t0:.0f} s; "
          f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
