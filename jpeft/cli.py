"""``jpeft`` command line: ``jpeft demo`` fine-tunes the embedded MiniLM on movie-review sentiment.

``python -m jpeft.cli demo [--method PRESET] [--steps N] [--set KEY=VALUE ...] ...`` runs a method
preset (:mod:`jpeft.presets`) through the one recipe (:func:`jpeft.recipes.finetune.run`);
``python -m jpeft.cli presets`` lists the presets, their stages and options;
``python -m jpeft.cli decoder [--method lora,prefix,ia3,houlsby,prompt]`` runs the decoder example
(:mod:`jpeft.recipes.decoder`). Both take ``--quantize {none,nf4,int8}``: the base stored quantized
after loading (QLoRA, :mod:`jpeft.recipes.quantization`).
``python -m jpeft.cli plan --model llama-3-8b --mesh fsdp=16,tp=4 --batch 256 --seq 4096`` sizes a
sharded run by compiling its train step on forced host devices (:mod:`jpeft.plan`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from jpeft import presets
from jpeft.core import host_memory

#: Flags that set a preset option (flag destination -> option name); each applies to the presets
#: that have the option.
OPTION_FLAGS = {"steps": "steps", "lr": "lr", "head_lr": "head_lr", "seed": "seed", "rank": "rank",
                "alpha": "alpha", "fraction": "fraction", "warmup_steps": "warmup_steps",
                "far_score": "score", "density": "density", "refine_steps": "refine_steps",
                "structured": "structured", "d": "d", "fisher_examples": "fisher_examples"}


def preset_options(args: argparse.Namespace) -> dict:
    """The options given on the command line: the flags that were set, then ``--set`` pairs.

    Raises:
      ValueError: a flag or ``--set`` key the preset has no option for (naming its options), a
        value of the wrong type, or a ``--set`` item that is not ``KEY=VALUE``.
    """
    preset = presets.get(args.method)
    options = {}
    for dest, name in OPTION_FLAGS.items():
        value = getattr(args, dest)
        if value is None or (dest == "seed" and name not in preset.defaults):
            continue
        if name not in preset.defaults:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} does not apply to --method {preset.name}; its options: "
                             f"{', '.join(preset.defaults)}")
        options[name] = value
    for item in args.set or ():
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        options[key.strip()] = presets.parse_value(text)
    options = presets.resolve(preset, options)
    preset.stages(options)          # checks the values (e.g. FAR's score) before anything loads
    return options


def demo(args: argparse.Namespace, options: dict) -> int:
    import jax

    import jpeft
    from jpeft.recipes import finetune, movies

    t0 = time.perf_counter()
    task = movies.load_task(seq=args.seq, seed=args.seed, dev_limit=args.dev_limit)
    print(f"jpeft {jpeft.__version__} | jax {jax.__version__} on {jax.devices()[0].platform} "
          f"| model: {task.model_dir}")
    print(f"data: movie-review sentences, {len(task.train)} train / {len(task.dev)} dev, "
          f"{100 * task.train.labels.mean():.1f}% positive in train; sequence length {args.seq}, "
          f"batch {args.batch}")
    env = movies.env(task, batch=args.batch, progress=not args.no_progress)
    outcome = finetune.run(args.method, env, options, out=args.out, quantize=args.quantize)
    print(f"total time {time.perf_counter() - t0:.1f} s")
    if not outcome.ok:
        print("ERROR: reload or merge changed the predictions", file=sys.stderr)
    return 0 if outcome.ok else 1


def decoder_example(args: argparse.Namespace) -> int:
    from jpeft.recipes import decoder
    results = decoder.run(args.method.split(","), base_steps=args.base_steps, steps=args.steps,
                          lr=args.lr, seed=args.seed, quantize=args.quantize)
    return 0 if all(np.isfinite(r.adapted_loss) for r in results.values()) else 1


def list_presets() -> int:
    for name in presets.names():
        preset = presets.get(name)
        stages = preset.stages(presets.resolve(preset))
        print(f"{name}: {preset.summary}\n  stages: "
              + ", ".join(f"{s.name} ({type(s).__name__.lower()})" for s in stages)
              + f"\n  options: {json.dumps(dict(preset.defaults))}"
              + f"\n  on a quantized base (--quantize nf4/int8): "
              + ("yes" if preset.quantized_base else "no (its delta changes the weights)"))
    return 0


def add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    """``--quantize {none,nf4,int8}`` (:mod:`jpeft.recipes.quantization`)."""
    from jpeft.recipes.quantization import CHOICES
    parser.add_argument(
        "--quantize", choices=CHOICES, default="none",
        help="store the base's linear weights quantized after loading (QLoRA: NF4 in blocks of "
             "64 with double-quantized scales, or int8 per output channel; embeddings and the "
             "head stay in full precision) and train on top; the demo's merge check merges "
             "into the dequantized base (default: none)")


def build_parser() -> argparse.ArgumentParser:
    """The ``jpeft`` argument parser (subcommands ``demo`` and ``presets``)."""
    parser = argparse.ArgumentParser(prog="jpeft", description=__doc__)
    parser.add_argument(
        "--release-host-memory", action="store_true",
        help="keep glibc's default of returning freed memory to the OS (by default importing "
             "jpeft keeps it for reuse on CPU: XLA:CPU's temporaries are reused, not faulted in "
             "again every step); the same as JPEFT_HOST_MEMORY=release")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("presets", help="list the method presets, their stages and options")
    d = sub.add_parser("demo", help="fine-tune the embedded MiniLM on movie-review sentiment")
    d.add_argument("--method", choices=presets.names(), default="lora", help="the method preset")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any option of the preset (repeatable; see `jpeft presets`)")
    d.add_argument("--steps", type=int, default=None, help="training steps (preset default: 250)")
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--seq", type=int, default=64)
    d.add_argument("--lr", type=float, default=None, help="peak learning rate (default per preset)")
    d.add_argument("--head-lr", type=float, default=None,
                   help="peak learning rate of the head (preset default: 1e-2)")
    d.add_argument("--seed", type=int, default=0, help="data split, initialisation, data order")
    d.add_argument("--rank", type=int, default=None, help="LoRA rank (8)")
    d.add_argument("--alpha", type=float, default=None, help="LoRA/AdaLoRA alpha (8)")
    d.add_argument("--fraction", type=float, default=None,
                   help="FAR: kept fraction of FFN columns (0.2)")
    d.add_argument("--warmup-steps", type=int, default=None,
                   help="FAR: warm-up steps for scoring (20)")
    d.add_argument("--far-score", choices=presets.FAR_SCORES, default=None,
                   help="FAR: rank columns by their change over the warm-up or by magnitude "
                        "(change)")
    d.add_argument("--density", type=float, default=None,
                   help="diff pruning / FishMask: kept fraction of all entries but the head's "
                        "(0.005)")
    d.add_argument("--refine-steps", type=int, default=None,
                   help="diff pruning: re-fine-tune steps with the mask fixed (50)")
    d.add_argument("--structured", action="store_true", default=None,
                   help="diff pruning: one gate per tensor too")
    d.add_argument("--d", type=int, default=None, help="SAID/DID: intrinsic dimension (1000)")
    d.add_argument("--fisher-examples", type=int, default=None,
                   help="FishMask: examples for the empirical Fisher (256; paper: 1024)")
    d.add_argument("--dev-limit", type=int, default=0, help="evaluate on the first N dev examples")
    add_quantize_flag(d)
    d.add_argument("--out", default=os.path.join("runs", "demo"))
    d.add_argument("--no-progress", action="store_true")
    from jpeft.recipes.decoder import LR
    g = sub.add_parser("decoder", help="a tiny byte-level decoder: base trained on negative "
                                       "reviews, an adapter on positive ones; generations before "
                                       "and after")
    g.add_argument("--method", default="lora",
                   help=f"one or several (comma-separated) of {', '.join(sorted(LR))}")
    g.add_argument("--steps", type=int, default=200, help="adapter training steps")
    g.add_argument("--base-steps", type=int, default=300, help="base model training steps")
    g.add_argument("--lr", type=float, default=None, help="adapter peak learning rate "
                                                          "(default per method)")
    g.add_argument("--seed", type=int, default=0)
    add_quantize_flag(g)
    add_plan_parser(sub)
    return parser


PLAN_FLAGS = ("model", "method", "targets", "mesh", "batch", "seq", "remat", "rank", "alpha",
              "device_memory", "dtype")


def add_plan_parser(sub) -> None:
    """``jpeft plan``: size a sharded run by compiling its train step (:mod:`jpeft.plan`)."""
    from jpeft import plan as plan_lib
    p = sub.add_parser(
        "plan", help="size a sharded fine-tuning run: compile its train step for a mesh of "
                     "forced host devices (no weights) and print per-device memory and FLOPs")
    p.add_argument("--model", default="tiny",
                   help=f"{', '.join(plan_lib.MODELS)}, or a path to a Hugging Face LLaMA "
                        f"config.json (default: tiny)")
    p.add_argument("--method", default="lora", help=f"{', '.join(plan_lib.METHODS)} (qlora: NF4 "
                                                    f"base, LoRA on top; default: lora)")
    p.add_argument("--targets", default="all-linear",
                   help="LoRA targets: all-linear or comma-separated module names, e.g. "
                        "q_proj,v_proj (default: all-linear)")
    p.add_argument("--mesh", default="fsdp=8",
                   help="mesh axes and sizes, e.g. fsdp=16,tp=4 or dp=8 (axes dp, fsdp, tp; "
                        "default: fsdp=8)")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, default=16, help="sequence length")
    p.add_argument("--remat", default="none", help=f"{', '.join(plan_lib.REMAT)} (default: none)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--device-memory", default=None,
                   help=f"memory per device to check against: {', '.join(plan_lib.DEVICE_MEMORY)}"
                        f" (decimal GB), or any size such as 24GiB")
    p.add_argument("--dtype", default="bfloat16", help=f"base weights and computation: "
                                                       f"{', '.join(plan_lib.DTYPES)}")
    p.add_argument("--no-reexec", action="store_true",
                   help="fail when this process's device count differs from the mesh size "
                        "instead of re-running with XLA_FLAGS=--xla_force_host_platform_device_"
                        "count=N JAX_PLATFORMS=cpu")


def plan_command(args: argparse.Namespace) -> int:
    """``jpeft plan``: validate the flags (a one-line error naming the flag, exit 2), make sure
    the process has exactly as many devices as the mesh (else re-run itself with that many forced
    host devices, unless ``--no-reexec``), then compile and print :func:`jpeft.plan.format_plan`."""
    from jpeft import plan as plan_lib
    targets = args.targets if args.targets == "all-linear" else tuple(
        t.strip() for t in args.targets.split(",") if t.strip())
    kw = dict(targets=targets, mesh=args.mesh, batch=args.batch, seq=args.seq, remat=args.remat,
              rank=args.rank, alpha=args.alpha, device_memory=args.device_memory,
              dtype=args.dtype)
    try:
        _, sizes, _ = plan_lib.check(args.model, args.method, args.mesh, args.batch, args.seq,
                                     args.remat, args.device_memory, args.dtype, args.rank)
        n = plan_lib.mesh_size(sizes)
        import jax
        have = jax.device_count()
        if have != n:
            if args.no_reexec or os.environ.get("JPEFT_PLAN_CHILD"):
                raise plan_lib.PlanError(
                    "--mesh", f"the mesh has {n} devices, this process has {have} (run without "
                              f"--no-reexec, or set XLA_FLAGS=--xla_force_host_platform_device_"
                              f"count={n} JAX_PLATFORMS=cpu)")
            return _rerun_plan(args, n)
        result = plan_lib.plan(args.model, args.method, **kw)
    except plan_lib.PlanError as e:
        print(f"jpeft plan: error: {e}", file=sys.stderr)
        return 2
    print(plan_lib.format_plan(result))
    return 0


def _rerun_plan(args: argparse.Namespace, n: int) -> int:
    """Run ``jpeft plan`` with the same flags in a new process with ``n`` forced host devices."""
    import subprocess
    argv = [sys.executable, "-m", "jpeft.cli", "plan"]
    for name in PLAN_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JPEFT_PLAN_CHILD": "1",
           "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])}
    sys.stdout.flush()
    return subprocess.run(argv, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.release_host_memory and host_memory.retained():
        # importing jpeft kept freed host memory (the default); only a fresh process undoes it
        host_memory.rerun_released(["-m", "jpeft.cli", *(sys.argv[1:] if argv is None else argv)])
    if args.command == "presets":
        return list_presets()
    if args.command == "decoder":
        return decoder_example(args)
    if args.command == "plan":
        return plan_command(args)
    try:
        options = preset_options(args)
        from jpeft.recipes import finetune
        finetune.check_quantize(args.method, args.quantize)   # before the model loads
    except ValueError as e:
        parser.error(str(e))
    return demo(args, options)


if __name__ == "__main__":
    sys.exit(main())
