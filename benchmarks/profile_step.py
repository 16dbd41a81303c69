"""Where a train step's time goes: a ``jax.profiler`` trace of one step, summed per XLA kernel.

Compiles the jpeft step of the chosen ``step_cost.py`` configurations (and, with ``--floor``, the
hand-written floor of ``floor.py``), runs each a few times, traces one step of each and prints,
per runner: the step's wall time, the time of its XLA:CPU kernels summed by kind (``ynn_fusion``:
matrix products through YNNPACK, ``dot``: other matrix products, ``*_fusion``: XLA's own loops)
and the slowest kernels with the HLO operation they came from (``--hlo-dir`` also writes each
optimised HLO module, to look a kernel up by name).

Usage::

    python benchmarks/profile_step.py lora_all_linear full --floor --top 8

Kernel times overlap (XLA:CPU runs independent kernels on its threads at once), so the sums can
exceed the step's wall time; compare kinds within a step and one runner with another.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

import common  # noqa: E402  (benchmarks/common.py)
import step_cost  # noqa: E402  (benchmarks/step_cost.py)

import jpeft  # noqa: E402
from jpeft.data import minilm_dir  # noqa: E402
from jpeft.models import load_hf_bert  # noqa: E402


def _kind(name: str) -> str:
    return re.sub(r"\.\d+$", "", name)


def _summarise(events: list[dict], label: str, top: int, ops: dict[str, str]) -> None:
    span = next(e for e in events if e["name"] == label)
    lo, hi = span["ts"], span["ts"] + span["dur"]
    kernels = [e for e in events if lo <= e["ts"] <= hi and not e["name"].startswith(
        ("$", "Thunk", "Threadpool", "SlinkyThreadPool", "end: ", "Wait", "RUN_"))]
    by_kind = collections.defaultdict(float)
    for e in kernels:
        by_kind[_kind(e["name"])] += e["dur"] / 1e3
    print(f"== {label[4:]}: step {span['dur'] / 1e3:.0f} ms wall, kernels {sum(by_kind.values()):.0f}"
          f" ms summed")
    print("   by kind (ms): " + ", ".join(
        f"{k} {t:.0f}" for k, t in sorted(by_kind.items(), key=lambda kv: -kv[1])[:10]))
    for e in sorted(kernels, key=lambda e: -e["dur"])[:top]:
        print(f"   {e['dur'] / 1e3:8.1f} ms  {e['name']:<28} {ops.get(e['name'], '')[:90]}")


def _op_names(hlo: str) -> dict[str, str]:
    """Kernel name -> the ``op_name`` metadata of its HLO instruction."""
    out = {}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]+)\"", hlo):
        out.setdefault(m.group(1), m.group(2))
    return out


def main(argv: list[str] | None = None) -> int:
    configs = step_cost._configs()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help="step_cost configurations: " + ", ".join(configs))
    p.add_argument("--floor", action="store_true", help="also the hand-written floor (flat)")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hlo-dir", default=None, help="write each optimised HLO module here")
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    print(f"host memory: {common.host_memory(args)}")    # before the first JAX computation
    bad = [c for c in args.configs if c not in configs]
    if bad:
        p.error(f"unknown configurations {bad}")

    loaded = load_hf_bert(minilm_dir(), num_labels=step_cost.NUM_LABELS, pooling="mean")
    model, variables = loaded.model, {"params": loaded.params}
    batch = {k: jnp.asarray(v) for k, v in step_cost.benchmark_batch(
        loaded.config.vocab_size, args.batch, args.seq).items()}
    sites = jpeft.probe(model.apply, variables, batch["input_ids"], batch["attention_mask"])
    env = step_cost.BatchEnv(model, variables, sites, batch)
    runners, ops = {}, {}
    hlo_dir = pathlib.Path(args.hlo_dir) if args.hlo_dir else None
    for name in args.configs:
        _, runners[name], compiled = step_cost._jax_prepare(name, configs[name], env, 3,
                                                            with_compiled=True)
        ops[name] = compiled.as_text()
        if args.floor and name in step_cost.FLOOR:
            _, runners[f"{name}_floor"], fc = step_cost._floor_prepare(
                step_cost.FLOOR[name], env, "flat", with_compiled=True)
            ops[f"{name}_floor"] = fc.as_text()
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        for name, text in ops.items():
            (hlo_dir / f"{name}.hlo.txt").write_text(text)
    for run in runners.values():
        run(), run()                                      # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for name, run in runners.items():
                with jax.profiler.TraceAnnotation(f"RUN_{name}"):
                    run()
        trace = glob.glob(f"{tmp}/plugins/profile/*/perfetto_trace.json.gz")[0]
        events = [e for e in json.load(gzip.open(trace))["traceEvents"] if e.get("ph") == "X"]
    for name in runners:
        _summarise(events, f"RUN_{name}", args.top, _op_names(ops[name]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
