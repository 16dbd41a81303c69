"""The planner's table for LLaMA-3 8B and 70B: LoRA, full fine-tuning and QLoRA at 8, 64 and 256
devices, compiled here for forced CPU host devices (``jpeft.plan.plan``; no weights).

Every row is one ``plan(model, method, mesh=..., batch=256, seq=4096, remat="full",
device_memory="80GB")``: LoRA rank 16 on all linear layers (factors and their AdamW state
float32), bf16 base, AdamW. The process forces ``max(devices)`` host devices before JAX starts;
a plan for fewer uses the first ones.

Usage::

    python benchmarks/plan_llama.py                      # 18 plans, ~3 min on 2 cores
    python benchmarks/plan_llama.py --models llama-3-8b --meshes fsdp=8

Writes ``benchmarks/results/plan_llama.txt`` (each plan as ``jpeft plan`` prints it) and
``benchmarks/results/plan_llama.jsonl`` (one row per plan: every :class:`jpeft.plan.Plan` field
and the machine), and prints the markdown table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

MESHES = ("fsdp=8", "fsdp=16,tp=4", "fsdp=64,tp=4")
MODELS = ("llama-3-8b", "llama-3-70b")
METHODS = ("lora", "full", "qlora")
HERE = pathlib.Path(__file__).resolve().parent


def _devices(mesh: str) -> int:
    n = 1
    for part in mesh.split(","):
        n *= int(part.split("=")[1])
    return n


def _gib(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--meshes", default=";".join(MESHES), help="';'-separated meshes")
    ap.add_argument("--out", default=str(HERE / "results" / "plan_llama"),
                    help="path without suffix: .txt and .jsonl are written")
    a = ap.parse_args(argv)
    meshes = a.meshes.split(";")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={max(_devices(m) for m in meshes)}")
    sys.path.insert(0, str(HERE))
    from common import machine, write_jsonl  # noqa: E402  (benchmarks/common.py)
    from jpeft import plan as pl

    texts, rows = [], []
    for model in a.models.split(","):
        for mesh in meshes:
            for method in a.methods.split(","):
                p = pl.plan(model, method, mesh=mesh, batch=256, seq=4096, remat="full",
                            device_memory="80GB")
                texts.append(f"=== {model} {method} {mesh}\n{pl.format_plan(p)}")
                rows.append({**p._asdict(), "mesh_arg": mesh})
                print(texts[-1], flush=True)
    out = pathlib.Path(a.out)
    info = machine()
    header = (f"# benchmarks/plan_llama.py, {info['date']}, jax {info['jax_version']}, compiled "
              f"for forced CPU host devices on {info.get('cpu_model') or 'this CPU'}\n")
    out.with_suffix(".txt").write_text(header + "\n".join(texts) + "\n")
    write_jsonl(out.with_suffix(".jsonl"), [{**r, "machine": info} for r in rows])
    print("| model | method | mesh (devices) | trainable | base / delta / optimizer per device "
          "| temporaries per device | peak per device | fits 80 GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['mesh_arg']} ({r['devices']}) | "
              f"{r['trainable']:,} | {_gib(r['base_bytes'])} / {_gib(r['delta_bytes'])} / "
              f"{_gib(r['opt_bytes'])} | {_gib(r['temp_bytes'])} | {_gib(r['peak_bytes'])} | "
              f"{'yes' if r['fits'] else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
