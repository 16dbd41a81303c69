"""What per-layer activation rematerialisation buys: memory and time of the train step.

The setting of ``benchmarks/step_cost.py`` (embedded MiniLM classifier, batch 32 x 64, AdamW,
one jpeft train step per configuration), with the model's layers wrapped in ``nn.remat`` under
each ``jax.checkpoint`` policy (``BertForSequenceClassification(config, remat=policy)``: the
parameters and the math are the same, only what the backward pass keeps changes). For every
configuration and policy, in one run:

* XLA memory of the compiled step (``memory_analysis()``: temporaries, the activation memory)
  and XLA FLOPs (``cost_analysis()``: the recomputation shows up here);
* median and minimum step time, the policies of one configuration timed in alternation
  (one step each per round), and their ratios to the step without rematerialisation.

Usage::

    python benchmarks/remat_cost.py                       # 4 configurations x 4 policies
    python benchmarks/remat_cost.py --only lora_all_linear --steps 5

Results go to ``benchmarks/results/remat_cost.jsonl`` (rewritten each run).
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import sys

import jax.numpy as jnp

import step_cost  # noqa: E402  (benchmarks/step_cost.py: the configurations and the runners)
import common  # noqa: E402  (benchmarks/common.py)
from common import loadavg, machine, write_jsonl  # noqa: E402

import jpeft  # noqa: E402
from jpeft.data import minilm_dir  # noqa: E402
from jpeft.models import load_hf_bert  # noqa: E402
from jpeft.models.bert import BertForSequenceClassification  # noqa: E402

DEFAULT_OUT = step_cost.REPO / "benchmarks" / "results" / "remat_cost.jsonl"
CONFIGS = ("full", "bitfit", "lora_qv", "lora_all_linear")
POLICIES = (None, "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--only", default=None, help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    host_memory = common.host_memory(args)    # before the first JAX computation
    names = CONFIGS if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        p.error(f"--only: unknown {bad}; choose from {CONFIGS}")

    loaded = load_hf_bert(minilm_dir(), num_labels=step_cost.NUM_LABELS, pooling="mean")
    variables = {"params": loaded.params}
    batch = {k: jnp.asarray(v) for k, v in step_cost.benchmark_batch(
        loaded.config.vocab_size, args.batch, args.seq).items()}
    envs = {}
    for policy in POLICIES:
        model = BertForSequenceClassification(loaded.config, remat=policy)
        sites = jpeft.probe(model.apply, variables, batch["input_ids"], batch["attention_mask"])
        envs[policy] = step_cost.BatchEnv(model, variables, sites, batch)
    configs = step_cost._configs()
    info = machine(host_memory=host_memory)
    rows = []
    print(f"remat cost: MiniLM-L6, batch {args.batch} x {args.seq}, {args.steps} timed steps, "
          f"policies timed in alternation per configuration", flush=True)
    for name in names:
        runners, by_policy = {}, {}
        for policy in POLICIES:
            key = policy or "none"
            print(f"[{name}] compile, remat={key}", flush=True)
            row, runners[key] = step_cost._jax_prepare(name, configs[name], envs[policy],
                                                       args.warmup + args.steps)
            by_policy[key] = row
        timed = step_cost._timed(args.steps, args.warmup, runners)
        base = by_policy["none"]
        for key, row in by_policy.items():
            rows.append({
                "config": name, "remat": key, "flops": row["flops"],
                "temp_bytes": row["temp_bytes"], "argument_bytes": row["argument_bytes"],
                "flops_ratio": row["flops"] / base["flops"],
                "temp_ratio": row["temp_bytes"] / base["temp_bytes"],
                "step_ms": timed[f"{key}_step_ms"], "step_ms_min": timed[f"{key}_step_ms_min"],
                "time_ratio": timed[f"{key}_step_ms"] / timed["none_step_ms"],
                "loss_first": timed[f"{key}_loss_first"], "loadavg_after": timed["loadavg_after"],
                "steps": args.steps, "batch": args.batch, "seq": args.seq, "machine": info})
        del runners
        gc.collect()
    out = pathlib.Path(args.out)
    write_jsonl(out, rows)
    head = (f"{'config':<17} {'remat':<34} {'temp MiB':>9} {'x none':>7} {'GFLOP':>7} "
            f"{'x none':>7} {'ms med/min':>12} {'x none':>7}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['config']:<17} {r['remat']:<34} {r['temp_bytes'] / 2**20:>9.1f} "
              f"{r['temp_ratio']:>7.3f} {r['flops'] / 1e9:>7.1f} {r['flops_ratio']:>7.3f} "
              f"{r['step_ms']:>6.0f}/{r['step_ms_min']:<5.0f} {r['time_ratio']:>7.3f}")
    print(f"\nload average at the end: {loadavg()}; wrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
