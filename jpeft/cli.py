"""``jpeft`` command line: ``jpeft demo`` fine-tunes the embedded MiniLM on movie-review sentiment.

``python -m jpeft.cli demo [--method lora|lora-all-linear|bitfit|adalora|far|diff-pruning|fishmask|said|did|full]
[--steps N] ...``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

METHODS = ("lora", "lora-all-linear", "bitfit", "adalora", "far", "diff-pruning", "fishmask", "said",
           "did", "full")


def build_method(name: str, rank: int = 8, alpha: float = 8.0, steps: int = 250):
    """The demo's configurations; each trains the classification head alongside the method.

    AdaLoRA's rank allocator (Hugging Face defaults, with the warm-up and final phases at 10% and
    20% of the ``steps``, decisions every 5 steps) and orthogonality penalty are part of the
    method, folded into the train step by ``jpeft.make_train_step(..., method=...)``."""
    import jpeft
    head = jpeft.full_finetune(("classifier",))
    if name == "lora":
        return jpeft.compose(lora=jpeft.lora(("query", "value"), rank=rank, alpha=alpha), head=head)
    if name == "lora-all-linear":
        return jpeft.compose(lora=jpeft.lora("all-linear", rank=rank, alpha=alpha,
                                             exclude=("classifier",)), head=head)
    if name == "bitfit":
        return jpeft.compose(bitfit=jpeft.bitfit(exclude=("classifier",)), head=head)
    if name == "adalora":
        from jpeft.methods.adalora import adalora
        return jpeft.compose(adalora=adalora(("query", "value"), init_r=12, alpha=alpha,
                                             total_steps=steps, t_init=steps // 10,
                                             t_final=steps // 5, delta_t=5), head=head)
    if name == "full":
        return jpeft.full_finetune()
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def default_lr(name: str) -> float:
    return {"full": 5e-5}.get(name, 4e-3 if "lora" in name else 5e-3)


def demo(args: argparse.Namespace) -> int:
    import jax

    import jpeft
    from jpeft.recipes import movies

    t0 = time.perf_counter()
    task = movies.load_task(seq=args.seq, seed=args.seed, dev_limit=args.dev_limit)
    print(f"jpeft {jpeft.__version__} | jax {jax.__version__} on {jax.devices()[0].platform} "
          f"| model: {task.model_dir}")
    print(f"data: movie-review sentences, {len(task.train)} train / {len(task.dev)} dev, "
          f"{100 * task.train.labels.mean():.1f}% positive in train; sequence length {args.seq}")

    if args.method == "far":      # two stages: score columns after a warm-up, then train them
        from jpeft.recipes import far_demo
        ok = far_demo.run_far(task, steps=args.steps, batch=args.batch, seed=args.seed,
                              progress=not args.no_progress, out=args.out,
                              fraction=args.fraction, warmup_steps=args.warmup_steps,
                              score=args.far_score, lr=args.lr or 1e-3, head_lr=args.head_lr)
        print(f"total time {time.perf_counter() - t0:.1f} s")
        return 0 if ok else 1

    if args.method in ("diff-pruning", "fishmask"):   # masks learnt or estimated from data first
        from jpeft.recipes import sparse_demos
        common = dict(steps=args.steps, batch=args.batch, seed=args.seed,
                      progress=not args.no_progress, out=args.out, density=args.density)
        if args.method == "diff-pruning":
            ok = sparse_demos.run_diff_pruning(task, **common, refine_steps=args.refine_steps,
                                               structured=args.structured, lr=args.lr or 1e-4,
                                               head_lr=args.head_lr)
        else:
            ok = sparse_demos.run_fishmask(task, **common, fisher_examples=args.fisher_examples,
                                           lr=args.lr or 1e-3, head_lr=args.head_lr)
        return 0 if ok else 1

    if args.method in ("said", "did"):   # a d-dimensional subspace of the whole model + the head
        from jpeft.recipes import intrinsic_demo
        ok = intrinsic_demo.run_intrinsic(task, d=args.d, said=args.method == "said",
                                          steps=args.steps, batch=args.batch, seed=args.seed,
                                          progress=not args.no_progress, out=args.out, lr=args.lr,
                                          head_lr=args.head_lr)
        return 0 if ok else 1

    rebuild = lambda: build_method(args.method, args.rank, args.alpha, args.steps)
    method = rebuild()
    delta = method.init(jax.random.key(args.seed), task.variables, task.sites)
    print(f"method: {args.method}  {json.dumps(method.config, default=str)}")
    print(jpeft.param_report(task.variables, delta))

    _, before = movies.evaluate(task, method, task.variables, delta)
    print(f"dev accuracy before fine-tuning: {100 * before:.2f}%")
    lr = args.lr or default_lr(args.method)
    result = movies.fine_tune(task, method, delta, steps=args.steps, batch=args.batch, lr=lr,
                              head_lr=args.head_lr, seed=args.seed,
                              progress=not args.no_progress)
    delta = result.delta
    extra = {"method": args.method}
    if args.method == "adalora":
        from jpeft.methods.adalora import rank_pattern
        extra["rank_pattern"] = rank_pattern(delta)
        print(f"AdaLoRA final ranks: {extra['rank_pattern']}")
    dev_logits, after = movies.evaluate(task, method, task.variables, delta)
    print(f"dev accuracy after {args.steps} steps (batch {args.batch}, lr {lr}, head lr "
          f"{args.head_lr}): {100 * after:.2f}% (before: {100 * before:.2f}%); training took "
          f"{result.seconds:.1f} s ({result.seconds / args.steps:.3f} s/step)")

    ok = movies.check_save_reload_merge(task, method, delta, dev_logits, args.out, rebuild=rebuild,
                                        metadata=extra)
    print(f"total time {time.perf_counter() - t0:.1f} s")
    if not ok:
        print("ERROR: reload or merge changed the predictions", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jpeft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="fine-tune the embedded MiniLM on movie-review sentiment")
    d.add_argument("--method", choices=METHODS, default="lora")
    d.add_argument("--steps", type=int, default=250)
    d.add_argument("--batch", type=int, default=32)
    d.add_argument("--seq", type=int, default=64)
    d.add_argument("--lr", type=float, default=None, help="peak learning rate (default per method)")
    d.add_argument("--head-lr", type=float, default=1e-2, help="peak learning rate of the head")
    d.add_argument("--rank", type=int, default=8)
    d.add_argument("--alpha", type=float, default=8.0)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--fraction", type=float, default=0.2, help="FAR: kept fraction of FFN columns")
    d.add_argument("--warmup-steps", type=int, default=20, help="FAR: warm-up steps for scoring")
    d.add_argument("--far-score", choices=("change", "magnitude"), default="change")
    d.add_argument("--density", type=float, default=0.005,
                   help="diff pruning / FishMask: kept fraction of all entries but the head")
    d.add_argument("--refine-steps", type=int, default=50,
                   help="diff pruning: re-fine-tune steps with the mask fixed")
    d.add_argument("--structured", action="store_true", help="diff pruning: one gate per tensor too")
    d.add_argument("--d", type=int, default=1000, help="SAID/DID: intrinsic dimension")
    d.add_argument("--fisher-examples", type=int, default=256,
                   help="FishMask: examples for the empirical Fisher (paper: 1024)")
    d.add_argument("--dev-limit", type=int, default=0, help="evaluate on the first N dev examples")
    d.add_argument("--out", default=os.path.join("runs", "demo"))
    d.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
