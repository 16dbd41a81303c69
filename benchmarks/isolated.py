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

``--data movies`` is the realistic loop: real sentences of the embedded movie reviews (the
training split the demo uses), tokenized to ``--seq`` tokens with real padding, one new batch per
step (cycled over ``warmup + steps`` batches), each copied from host memory by the step as a
user's loop does (jpeft and the floor call their jitted step on numpy arrays; torch converts them
with ``torch.from_numpy``), the loss read back every step. ``--data random`` (the default):
``step_cost.py``'s one batch (32 x 64 random tokens, full mask) kept on the device.

``--model decoder`` runs the NNX LLaMA of ``decoder_cost.py`` (``lora_qv``, ``lora_all_linear``,
``full``; unrolled layers, random weights, one batch of random tokens kept on the device): jpeft,
its hand-written JAX floor (``decoder_floor.py``, the same weights and batch) and Hugging Face
PEFT on ``transformers.LlamaForCausalLM`` of the same configuration (``decoder_torch.py``).

Usage::

    python benchmarks/isolated.py [--configs lora_qv,lora_all_linear,full] [--reps 3]
        [--steps 15 --warmup 3] [--data random|movies] [--harness] [--torch-beside]

Rows go to ``benchmarks/results/isolated.jsonl`` (appended: one per configuration and run, with
every process's median, the load average and the machine) and the targets are printed: jpeft's
step at most 1.0x torch's (``jpeft_over_torch``, the median of the per-repetition ratios). The
batches are written once to a temporary ``.npz`` that every process reads.
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


def _torch_process(a, batches: list[dict], beside: str | None) -> dict:
    """torch's step alone; ``beside``: ``jpeft_imported`` (``import jpeft`` first) or ``jax_ran``
    (a jpeft step of the same configuration compiled and run twice, then left idle)."""
    if beside == "jpeft_imported":
        import jpeft  # noqa: F401  (its import-time allocator settings are the point)
    elif beside == "jax_ran":
        jax_step = _jax_process_step(a, "jpeft")
        jax_step(), jax_step()
    import torch

    torch.set_num_threads(a.threads)
    if a.model == "decoder":
        import decoder_torch
        step, info = decoder_torch.prepare(a.config_torch, batches)
    else:
        import torch_step
        step, _ = torch_step.prepare(a.config_torch, pathlib.Path(a.model_dir), batches,
                                     a.warmup + a.steps)
        info = {}
    out = _time(step, a.steps, a.warmup)
    out.update(info)
    out.update({"torch_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                "jax_imported": "jax" in sys.modules})
    return out


def _decoder_step(a, runner: str):
    """The run_step of ``jpeft`` or ``floor`` for ``a.config`` on the decoder, built as
    ``decoder_cost.py`` does (random weights, unrolled layers, the first batch kept on the
    device); the floor (``decoder_floor.py``) starts from the same weights and compiles with the
    options jpeft's step gets by default."""
    import jax.numpy as jnp

    import decoder_cost
    import jpeft
    model = decoder_cost._build_model(decoder_cost.MODEL, 0, "unrolled")
    batch = {k: jnp.asarray(v) for k, v in _load_batches(a.batch_file)[0].items()}
    if runner == "floor":
        import decoder_floor
        from jpeft.core import xla_options
        return decoder_floor.prepare(a.config, model, batch,
                                     compiler_options=xla_options.train_step_options())
    apply, params = jpeft.nnx.split(model)
    sites = jpeft.probe(apply, params, batch["input_ids"], batch["attention_mask"])
    spec = decoder_cost._configs()[a.config]
    return decoder_cost._jpeft_prepare(a.config, spec, apply, params, sites, batch).run


def _jax_process_step(a, runner: str):
    """The run_step of ``jpeft`` or ``floor`` for ``a.config``, built as ``step_cost.py`` does
    (compiled for the first batch's shapes; several batches: the realistic loop, each step takes
    the next host batch); ``--model decoder``: :func:`_decoder_step`."""
    if a.model == "decoder":
        return _decoder_step(a, runner)
    import jax.numpy as jnp

    import step_cost
    from jpeft.models import load_hf_bert
    import jpeft
    loaded = load_hf_bert(pathlib.Path(a.model_dir), num_labels=step_cost.NUM_LABELS,
                          pooling="mean")
    model, variables = loaded.model, {"params": loaded.params}
    batches = _load_batches(a.batch_file)
    batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
    host = batches if len(batches) > 1 else None
    sites = jpeft.probe(model.apply, variables, batch["input_ids"], batch["attention_mask"])
    env = step_cost.BatchEnv(model, variables, sites, batch)
    if runner == "floor":
        return step_cost._floor_prepare(step_cost.FLOOR[a.config], env, "flat",
                                        batches=host)[1]
    return step_cost._jax_prepare(a.config, step_cost._configs()[a.config], env,
                                  a.warmup + a.steps, batches=host)[1]


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
                                                  _load_batches(a.batch_file),
                                                  a.warmup + a.steps)[0]
        else:
            runners["jax" if r == "jpeft" else r] = _jax_process_step(a, r)
    timed = step_cost._timed(a.steps, a.warmup, runners)
    return {("jpeft" if k == "jax" else k): timed[f"{k}_step_ms"] for k in runners}


def _load_batches(path: str) -> list[dict]:
    """The batches of ``path`` (arrays stacked ``[S, ...]`` by :func:`_write_batches`)."""
    import numpy as np
    with np.load(path) as z:
        stacked = {k: z[k] for k in z.files}
    return [{k: v[i] for k, v in stacked.items()}
            for i in range(len(next(iter(stacked.values()))))]


def _write_batches(path: str, batches: list[dict]) -> None:
    import numpy as np
    np.savez(path, **{k: np.stack([b[k] for b in batches]) for k in batches[0]})


def movie_batches(model_dir: pathlib.Path, count: int, batch: int, seq: int) -> list[dict]:
    """``count`` batches of the movie reviews' training split (``jpeft.recipes``' split: seed 0,
    10% dev), in order, tokenized with the model's tokenizer to ``seq`` tokens (truncated,
    right-padded): ``input_ids``, ``attention_mask``, ``labels``, int32 numpy."""
    from jpeft.data import load_movie_reviews, train_dev_split
    from jpeft.models.tokenizer import encode, load_tokenizer
    (texts, labels), _ = train_dev_split(*load_movie_reviews())
    tok = load_tokenizer(model_dir / "tokenizer.json", max_length=seq)
    need = count * batch
    if need > len(texts):
        raise SystemExit(f"--data movies: {count} batches of {batch} need {need} sentences; the "
                         f"training split has {len(texts)} (lower --steps/--warmup/--batch)")
    enc = encode(tok, texts[:need])
    return [{"input_ids": enc["input_ids"][i * batch:(i + 1) * batch],
             "attention_mask": enc["attention_mask"][i * batch:(i + 1) * batch],
             "labels": labels[i * batch:(i + 1) * batch].astype("int32")} for i in range(count)]


def child(a) -> None:
    sys.path.insert(0, str(HERE))
    if a.child == "harness":
        out = _harness_process(a)
    elif a.child.startswith("torch"):
        beside = None if a.child == "torch" else a.child[len("torch_"):]
        out = _torch_process(a, _load_batches(a.batch_file), beside)
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
           "--runners", runners, "--model", a.model]
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
    if a.model == "decoder":
        import decoder_floor
        import decoder_torch
        torch_kind = config if config in decoder_torch.TARGETS else None
        runners = [r for r in a.runners.split(",")
                   if r == "jpeft" or (r == "floor" and config in decoder_floor.CONFIGS)
                   or (r == "torch" and torch_kind is not None)]
        if a.harness or a.torch_beside:
            raise SystemExit("--harness and --torch-beside are for --model bert")
    else:
        import step_cost
        torch_kind = step_cost._configs()[config].torch
        runners = [r for r in a.runners.split(",")
                   if not (r == "floor" and config not in step_cost.FLOOR)
                   and not (r == "torch" and torch_kind is None)]
    if a.torch_beside and "torch" in runners:
        runners += list(BESIDE)
    per: dict[str, list[dict]] = {r: [] for r in runners}
    harness: list[dict] = []
    for rep in range(a.reps):
        order = runners[rep % len(runners):] + runners[:rep % len(runners)]
        for r in order:
            res = _run(r, config, a, batch_file, model_dir, torch_kind)
            per[r].append(res)
            print(f"  [{config}] rep {rep + 1}/{a.reps} {r}: {res['median_ms']:.1f} ms",
                  flush=True)
        if a.harness:
            inside = [r for r in runners if r in RUNNERS]
            h = _run("harness", config, a, batch_file, model_dir, torch_kind, ",".join(inside))
            harness.append(h)
            print(f"  [{config}] rep {rep + 1}/{a.reps} harness: "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in h.items()), flush=True)
    row = {"config": config, "model": a.model, "torch_config": torch_kind, "reps": a.reps,
           "steps": a.steps,
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
    ap.add_argument("--batch", type=int, default=None, help="32 (bert), 8 (decoder)")
    ap.add_argument("--seq", type=int, default=None, help="64 (bert), 128 (decoder)")
    ap.add_argument("--model", choices=("bert", "decoder"), default="bert",
                    help="bert: the embedded MiniLM classifier (step_cost.py's); decoder: the "
                         "~25M-parameter NNX LLaMA of decoder_cost.py against Hugging Face PEFT "
                         "on transformers.LlamaForCausalLM, same config (random weights and "
                         "tokens; --batch 8 --seq 128 by default), and its JAX floor "
                         "(decoder_floor.py)")
    ap.add_argument("--data", choices=("random", "movies"), default="random",
                    help="random: one batch of random tokens kept on the device (step_cost.py's); "
                         "movies: the realistic loop, a new padded batch of real reviews each "
                         "step, copied from the host, the loss read back")
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
    import common
    import torch_step
    from jpeft.data import minilm_dir
    model_dir = pathlib.Path(minilm_dir())
    default = {"bert": (32, 64), "decoder": (8, 128)}[a.model]
    a.batch, a.seq = a.batch or default[0], a.seq or default[1]
    if a.model == "decoder":
        import decoder_torch
        if a.data != "random":
            raise SystemExit("--model decoder: only --data random")
        batches = [decoder_torch.benchmark_batch(a.batch, a.seq)]
    elif a.data == "movies":
        batches = movie_batches(model_dir, a.warmup + a.steps, a.batch, a.seq)
    else:
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        batches = [torch_step.benchmark_batch(vocab, a.batch, a.seq)]
    pad = 1.0 - sum(float(b["attention_mask"].mean()) for b in batches) / len(batches)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = str(pathlib.Path(tmp) / "batches.npz")
        _write_batches(batch_file, batches)
        for config in a.configs.split(","):
            load = common.loadavg()
            row = race(config, a, batch_file, str(model_dir))
            row.update({"batch": a.batch, "seq": a.seq, "data": a.data,
                        "batches": len(batches), "padding_fraction": round(pad, 4),
                        "load_at_start": load, "load_at_end": common.loadavg(),
                        **common.machine()})
            row["targets"] = targets(row)
            rows.append(row)
            common.append_jsonl(a.out, row)
            print(json.dumps({k: v for k, v in row.items() if "over" in k or k.endswith("_ms")
                              or k == "harness_agrees"}), flush=True)
    print("\nTargets (each runner in a process of its own; medians of per-repetition ratios)")
    for row in rows:
        for t in row["targets"]:
            print(f"  {'PASS' if t['passed'] else 'MISS'}  {row['config']} ({a.data}): "
                  f"{t['check']} ({t['value']:.3f})")
    return rows


def targets(row: dict) -> list[dict]:
    """The step-time targets of a row: jpeft at most 1.0x torch (and at most 1.05x the floor)."""
    out = []
    for key, limit, what in (("jpeft_over_torch", 1.0, "jpeft step <= 1.0x Hugging Face PEFT"),
                             ("jpeft_over_floor", 1.05, "jpeft step <= 1.05x the JAX floor")):
        if row.get(key) is not None:
            out.append({"check": what, "value": row[key], "passed": row[key] <= limit})
    return out


if __name__ == "__main__":
    main()
