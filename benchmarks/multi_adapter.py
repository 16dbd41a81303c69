"""Mixed-adapter batches: one forward over a batch whose examples use different LoRA adapters
(``jpeft.multi.mixed``), against running the sub-batch of each adapter one after another.

``python benchmarks/multi_adapter.py [--adapters K] [--batch B] [--seq T] [--steps N] [--out P]``

On the embedded MiniLM (random token ids, all-ones mask): ``K`` LoRA adapters (r = 8, alpha = 16,
query and value, random non-zero factors); every example is assigned an adapter (round robin,
then shuffled; ``-1``, the base model, for every ``K + 1``-th example). Forms, each jitted and
compiled once, timed in alternation (one call of each per round) after a warm-up:

* ``base``: the plain model on the whole batch (the floor);
* ``mixed``: ``jpeft.wrap(apply, mixed(**adapters))(..., method_inputs=index)`` on the whole
  batch: every adapter's low-rank path runs on every example, each example keeps its own;
* ``sub_batches``: for each adapter (and the base), its examples gathered and run through
  ``jpeft.wrap(apply, lora_k)`` (and the plain model), one call after another, outputs scattered
  back (a compiled function per sub-batch, built before timing).

Reported: XLA FLOPs (``cost_analysis``) of each form (the sub-batch sum for ``sub_batches``),
median and minimum times, the ratios to ``sub_batches`` and to ``base``, and the largest
difference of the mixed outputs from the sub-batch outputs. A timing taken while the machine is
loaded is not a result: the row records the load average before and after.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import common
import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path, default=ROOT / "results" / "multi_adapter.jsonl")
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    host_memory = common.host_memory(args)    # before the first JAX computation

    import jpeft
    from jpeft import multi
    from jpeft.data.embedded import minilm_dir
    from jpeft.models.loading import load_hf_bert

    loaded = load_hf_bert(minilm_dir(), num_labels=2, pooling="mean")
    model, variables = loaded.model, {"params": loaded.params}
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, loaded.config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    sites = jpeft.probe(model.apply, variables, ids[:2], mask[:2])
    K = args.adapters
    names = [f"a{k}" for k in range(K)]
    methods = {n: jpeft.lora(("query", "value"), rank=8, alpha=16.0) for n in names}
    deltas = {}
    for k, n in enumerate(names):
        d = methods[n].init(jax.random.key(k), variables, sites)
        leaves, tree = jax.tree.flatten(d)
        deltas[n] = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(
            jax.random.key(100 + k + i), x.shape, x.dtype) for i, x in enumerate(leaves)])
    index = np.array([(i % (K + 1)) if i % (K + 1) < K else -1 for i in range(args.batch)],
                     np.int32)
    rng.shuffle(index)

    base_fn = jax.jit(model.apply)
    mixed_fn = jax.jit(jpeft.wrap(model.apply, multi.mixed(**methods), sites))
    groups = {k: np.flatnonzero(index == k) for k in [-1] + list(range(K))}
    subs = {}
    for k, rows in groups.items():
        if not rows.size:
            continue
        f = base_fn if k < 0 else jax.jit(jpeft.wrap(model.apply, methods[names[k]], sites))
        subs[k] = (rows, f)

    def run_sub(k, rows, f):
        x, m = ids[rows], mask[rows]
        return f(variables, x, m) if k < 0 else f(variables, deltas[names[k]], x, m)

    def sub_batches():
        out = np.zeros((args.batch, 2), np.float32)
        for k, (rows, f) in subs.items():
            out[rows] = np.asarray(run_sub(k, rows, f))
        return out

    compiled = {
        "base": base_fn.lower(variables, ids, mask).compile(),
        "mixed": mixed_fn.lower(variables, deltas, ids, mask, method_inputs=index).compile(),
    }
    sub_flops = sum(common.cost(
        (base_fn.lower(variables, ids[r], mask[r]) if k < 0 else
         f.lower(variables, deltas[names[k]], ids[r], mask[r])).compile())["flops"]
        for k, (r, f) in subs.items())
    runners = {
        "base": lambda: np.asarray(base_fn(variables, ids, mask)),
        "mixed": lambda: np.asarray(mixed_fn(variables, deltas, ids, mask, method_inputs=index)),
        "sub_batches": sub_batches,
    }
    diff = float(np.abs(runners["mixed"]() - sub_batches()).max())
    load_before = common.loadavg()
    times = {n: [] for n in runners}
    for _ in range(args.warmup):
        for f in runners.values():
            f()
    for _ in range(args.steps):
        for n, f in runners.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    med = {n: 1e3 * float(np.median(t)) for n, t in times.items()}
    flops = {"base": common.cost(compiled["base"])["flops"],
             "mixed": common.cost(compiled["mixed"])["flops"], "sub_batches": sub_flops}
    row = {**common.machine(kind="multi_adapter", host_memory=host_memory), "adapters": K, "batch": args.batch,
           "seq": args.seq, "examples_per_adapter": {str(k): int(r.size) for k, r in
                                                     groups.items()},
           "steps": args.steps, "median_ms": med,
           "min_ms": {n: 1e3 * min(t) for n, t in times.items()}, "flops": flops,
           "mixed_over_sub_batches_time": med["mixed"] / med["sub_batches"],
           "mixed_over_base_time": med["mixed"] / med["base"],
           "mixed_over_sub_batches_flops": flops["mixed"] / flops["sub_batches"],
           "max_abs_diff_mixed_vs_sub_batches": diff,
           "loadavg_before": load_before, "loadavg_after": common.loadavg()}
    for n in runners:
        print(f"{n:12} {med[n]:8.1f} ms  {flops[n] / 1e9:7.2f} GFLOP")
    print(f"mixed / sub-batches: time {row['mixed_over_sub_batches_time']:.3f}, FLOPs "
          f"{row['mixed_over_sub_batches_flops']:.3f}; mixed / base time "
          f"{row['mixed_over_base_time']:.3f}; max |mixed - sub-batches| {diff:.2e}")
    common.write_jsonl(args.out, [row])
    return 0


if __name__ == "__main__":
    sys.exit(main())
