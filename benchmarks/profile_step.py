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

``--torch`` also profiles Hugging Face PEFT's step of each configuration with ``torch.profiler``,
in a process of its own (``torch_step.py --profile``), and prints both frameworks' time per
category side by side: the products (matrix multiplications; on XLA:CPU the kernels whose HLO
operation is a ``dot_general``, fused epilogues included), GELU, the attention core, layer norm,
the optimizer, copies, and the rest.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import re
import subprocess
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


#: Host-side events of a JAX step (dispatch and the executable's launch), not kernels.
HOST_EVENTS = ("PjitFunction", "CommonPjRtLoadedExecutable")


def _category(kernel: str, op: str) -> str:
    """A JAX kernel's category for the side-by-side table with torch (``torch_step.py``)."""
    if kernel.startswith(HOST_EVENTS):
        return "dispatch (host)"
    if op.endswith("dot_general") or _kind(kernel) in ("dot", "ynn_fusion"):
        return "products"
    if "erf" in kernel:
        return "GELU"
    return "other"


def _categories(events: list[dict], label: str, ops: dict[str, str]) -> dict[str, float]:
    span = next(e for e in events if e["name"] == label)
    lo, hi = span["ts"], span["ts"] + span["dur"]
    out: dict[str, float] = {}
    for e in events:
        if lo <= e["ts"] <= hi and not e["name"].startswith(
                ("$", "Thunk", "Threadpool", "SlinkyThreadPool", "end: ", "Wait", "RUN_")):
            c = _category(e["name"], ops.get(e["name"], ""))
            out[c] = out.get(c, 0.0) + e["dur"] / 1e3
    return out


def _torch_profile(kind: str, batch: int, seq: int) -> dict:
    """``torch_step.profile`` in a process of its own (no JAX in it)."""
    here = pathlib.Path(__file__).resolve().parent
    threads = len(os.sched_getaffinity(0))
    p = subprocess.run([sys.executable, str(here / "torch_step.py"), "--profile", kind,
                        str(minilm_dir()), str(batch), str(seq), str(threads)],
                       capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"torch profile of {kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _side_by_side(name: str, jax_wall: float, jax_cats: dict, torch_prof: dict) -> None:
    cats = ["products", "attention core", "GELU", "layer norm", "optimizer", "copies", "other",
            "dispatch (host)"]
    print(f"== {name}: ms per category (JAX: XLA kernels summed, they overlap; torch: self CPU "
          f"time); step wall: jpeft {jax_wall:.0f} ms, torch {torch_prof['wall_ms']:.0f} ms "
          f"(profiled steps)")
    tc = torch_prof["categories_ms"]
    for c in cats:
        j, t = jax_cats.get(c), tc.get(c)
        if j is None and t is None:
            continue
        fmt = lambda v: "-" if v is None else f"{v:.0f}"
        print(f"   {c:<16} jpeft {fmt(j):>6}   torch {fmt(t):>6}")
    print("   torch's slowest operators: " + ", ".join(
        f"{k} {v:.0f}" for k, v in list(torch_prof["ops_ms"].items())[:6]))


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
    p.add_argument("--torch", action="store_true",
                   help="also profile Hugging Face PEFT's step (own process) and compare")
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    print(f"host memory: {common.host_memory(args)}")    # before the first JAX computation
    bad = [c for c in args.configs if c not in configs]
    if bad:
        p.error(f"unknown configurations {bad}")

    # torch first, in processes of their own, before this process runs any JAX computation
    # (its XLA threads then exist but are idle): nothing of JAX's runs beside torch's step.
    torch_profiles = {name: _torch_profile(configs[name].torch, args.batch, args.seq)
                      for name in args.configs if args.torch and configs[name].torch}
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
    if args.torch:
        print()
        for name in args.configs:
            if name not in torch_profiles:
                print(f"== {name}: no Hugging Face PEFT counterpart")
                continue
            label = f"RUN_{name}"
            wall = next(e for e in events if e["name"] == label)["dur"] / 1e3
            _side_by_side(name, wall, _categories(events, label, _op_names(ops[name])),
                          torch_profiles[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
