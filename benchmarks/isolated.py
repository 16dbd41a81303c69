"""The train step of jpeft, the JAX floor and Hugging Face PEFT, each runner in a process of its own.

Two frameworks in one process slow each other: XLA's and PyTorch's thread pools compete for the
cores, OpenMP threads spin after a parallel region, and the allocator settings ``import jpeft``
applies (``jpeft.core.host_memory``) hold for torch's allocations too. This benchmark gives the
cross-framework figures: every runner (``jpeft``, ``floor``, ``torch``) of every configuration
(``lora_qv``, ``lora_all_linear``, ``full``, ...: ``step_cost.py``'s) runs in a fresh process,
the processes alternated (the order turns each repetition), ``--reps`` repetitions. A process
loads the model, warms up ``--warmup`` steps and times ``--steps`` (median); a torch process
never imports JAX or jpeft (``torch_step.py``). The ratio ``jpeft / torch`` of a configuration
is the median of the per-repetition ratios (the two processes of a repetition ran back to back).

``--harness`` also runs, in one more process per repetition, ``step_cost.py``'s in-process
harness on the same runners (alternated step by step, as ``step_cost.py`` times them) and reports
each runner's in-harness median against its own-process median (``*_harness_over_own``; within 5%
is ``harness_agrees``). ``--torch-beside`` times torch alone in processes that also carry what
the harness adds: ``jpeft`` imported (its allocator settings; no JAX computation), or a JAX step
compiled and run during the warm-up (XLA's thread pools alive, idle while torch is timed): the
causes, taken apart.

Usage::

    python benchmarks/isolated.py [--configs lora_qv,lora_all_linear,full] [--reps 3]
        [--steps 15 --warmup 3] [--harness] [--torch-beside]

Rows go to ``benchmarks/results/isolated.jsonl`` (appended: one per configuration and run, with
every process's median, the load average and the machine). The batch: ``step_cost.py``'s (32 x 64
random tokens, full mask), written once to a temporary ``.npz`` that every process reads.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "results" / "isolated.jsonl"
RUNNERS = ("jpeft", "floor", "torch")
CONFIGS = ("lora_qv", "lora_all_linear", "full")
#: Torch processes with part of what the in-process harness adds (``--torch-beside``).
BESIDE = ("torch_jpeft_imported", "torch_jax_ran")
AGREE = 0.05


# --------------------------------------------------------------------------------------------
# One process


def _time(step, steps: int, warmup: int) -> dict:
    losses = [step() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "all_ms": [round(1e3 * t, 2) for t in times], "loss_first": losses[0],
            "loss_last": losses[-1]}


def _torch_process(a, batch_np: dict, beside: str | None) -> dict:
    """torch's step alone; ``beside``: ``jpeft_imported`` (``import jpeft`` first) or ``jax_ran``
    (a jpeft step of the same configuration compiled and run twice, then left idle)."""
    if beside == "jpeft_imported":
        import jpeft  # noqa: F401  (its import-time allocator settings are the point)
    elif beside == "jax_ran":
        jax_step = _jax_process_step(a, "jpeft")
        jax_step(), jax_step()
    import torch

    import torch_step
    torch.set_num_threads(a.threads)
    step, finish = torch_step.prepare(a.config_torch, pathlib.Path(a.model_dir), batch_np,
                                      a.warmup + a.steps)
    out = _time(step, a.steps, a.warmup)
    out.update({"torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                "jax_imported": "jax" in sys.modules})
    return out


def _jax_process_step(a, runner: str):
    """The run_step of ``jpeft`` or ``floor`` for ``a.config``, built as ``step_cost.py`` does."""
    import jax.numpy as jnp

    import step_cost
    from jpeft.models import load_hf_bert
    import jpeft
    loaded = load_hf_bert(pathlib.Path(a.model_dir), num_labels=step_cost.NUM_LABELS,
                          pooling="mean")
    model, variables = loaded.model, {"params": loaded.params}
    batch = {k: jnp.asarray(v) for k, v in _load_batch(a.batch_file).items()}
    sites = jpeft.probe(model.apply, variables, batch["input_ids"], batch["attention_mask"])
    env = step_cost.BatchEnv(model, variables, sites, batch)
    if runner == "floor":
        return step_cost._floor_prepare(step_cost.FLOOR[a.config], env, "flat")[1]
    return step_cost._jax_prepare(a.config, step_cost._configs()[a.config], env,
                                  a.warmup + a.steps)[1]


def _harness_process(a) -> dict:
    """``step_cost.py``'s in-process harness on ``a.runners``: alternated step by step (imports
    in ``step_cost.py``'s order: JAX and jpeft, then torch)."""
    import step_cost
    import torch

    import torch_step
    torch.set_num_threads(a.threads)
    runners = {}
    for r in a.runners.split(","):
        if r == "torch":
            runners["torch"] = torch_step.prepare(a.config_torch, pathlib.Path(a.model_dir),
                                                  _load_batch(a.batch_file),
                                                  a.warmup + a.steps)[0]
        else:
            runners["jax" if r == "jpeft" else r] = _jax_process_step(a, r)
    timed = step_cost._timed(a.steps, a.warmup, runners)
    return {("jpeft" if k == "jax" else k): timed[f"{k}_step_ms"] for k in runners}


def _load_batch(path: str) -> dict:
    import numpy as np
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def child(a) -> None:
    sys.path.insert(0, str(HERE))
    if a.child == "harness":
        out = _harness_process(a)
    elif a.child.startswith("torch"):
        beside = None if a.child == "torch" else a.child[len("torch_"):]
        out = _torch_process(a, _load_batch(a.batch_file), beside)
    else:
        out = _time(_jax_process_step(a, a.child), a.steps, a.warmup)
        from jpeft.core import host_memory
        out["host_memory"] = host_memory.status()
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------------------------
# The parent: processes alternated


def _run(which: str, config: str, a, batch_file: str, model_dir: str, torch_kind: str | None,
         runners: str = "") -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--config", config, "--steps",
           str(a.steps), "--warmup", str(a.warmup), "--batch-file", batch_file, "--model-dir",
           model_dir, "--threads", str(a.threads), "--config-torch", torch_kind or "",
           "--runners", runners]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{which} ({config}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def race(config: str, a, batch_file: str, model_dir: str) -> dict:
    """Every runner of ``config`` in processes of their own, ``a.reps`` alternated repetitions."""
    sys.path.insert(0, str(HERE))
    import step_cost
    spec = step_cost._configs()[config]
    runners = [r for r in a.runners.split(",")
               if not (r == "floor" and config not in step_cost.FLOOR)
               and not (r == "torch" and spec.torch is None)]
    if a.torch_beside and "torch" in runners:
        runners += list(BESIDE)
    per: dict[str, list[dict]] = {r: [] for r in runners}
    harness: list[dict] = []
    for rep in range(a.reps):
        order = runners[rep % len(runners):] + runners[:rep % len(runners)]
        for r in order:
            res = _run(r, config, a, batch_file, model_dir, spec.torch)
            per[r].append(res)
            print(f"  [{config}] rep {rep + 1}/{a.reps} {r}: {res['median_ms']:.1f} ms",
                  flush=True)
        if a.harness:
            inside = [r for r in runners if r in RUNNERS]
            h = _run("harness", config, a, batch_file, model_dir, spec.torch, ",".join(inside))
            harness.append(h)
            print(f"  [{config}] rep {rep + 1}/{a.reps} harness: "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in h.items()), flush=True)
    row = {"config": config, "torch_config": spec.torch, "reps": a.reps, "steps": a.steps,
           "warmup": a.warmup, "threads": a.threads}
    for r, results in per.items():
        row[f"{r}_ms"] = statistics.median(x["median_ms"] for x in results)
        row[f"{r}_ms_per_process"] = [round(x["median_ms"], 2) for x in results]
        row[f"{r}_loss_first"] = results[0]["loss_first"]
    for r in runners:
        if r in ("jpeft", "floor"):
            continue
        for j in ("jpeft", "floor"):
            if j in per:
                row[f"{j}_over_{r}"] = statistics.median(
                    x["median_ms"] / y["median_ms"] for x, y in zip(per[j], per[r]))
    if "floor" in per and "jpeft" in per:
        row["jpeft_over_floor"] = statistics.median(
            x["median_ms"] / y["median_ms"] for x, y in zip(per["jpeft"], per["floor"]))
    if harness:
        agree = True
        for r in harness[0]:
            inside = statistics.median(h[r] for h in harness)
            row[f"{r}_harness_ms"] = inside
            row[f"{r}_harness_over_own"] = inside / row[f"{r}_ms"]
            agree &= abs(inside / row[f"{r}_ms"] - 1) <= AGREE
        row["harness_agrees"] = agree
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--runners", default=",".join(RUNNERS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch's intra-op threads (default: the usable cores)")
    ap.add_argument("--harness", action="store_true",
                    help="also time the runners in step_cost.py's in-process harness")
    ap.add_argument("--torch-beside", action="store_true",
                    help="also time torch beside jpeft's import and beside an idle JAX")
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--config-torch", help=argparse.SUPPRESS)
    ap.add_argument("--batch-file", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)

    sys.path.insert(0, str(HERE))
    import numpy as np

    import common
    import torch_step
    from jpeft.data import minilm_dir
    model_dir = str(minilm_dir())
    vocab = json.loads((pathlib.Path(model_dir) / "config.json").read_text())["vocab_size"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = str(pathlib.Path(tmp) / "batch.npz")
        np.savez(batch_file, **torch_step.benchmark_batch(vocab, a.batch, a.seq))
        for config in a.configs.split(","):
            load = common.loadavg()
            row = race(config, a, batch_file, model_dir)
            row.update({"batch": a.batch, "seq": a.seq, "load_at_start": load,
                        "load_at_end": common.loadavg(), **common.machine()})
            rows.append(row)
            common.append_jsonl(a.out, row)
            print(json.dumps({k: v for k, v in row.items() if "over" in k or k.endswith("_ms")
                              or k == "harness_agrees"}), flush=True)
    return rows


if __name__ == "__main__":
    main()
