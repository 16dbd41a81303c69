"""``jpeft`` command line: ``jpeft demo`` fine-tunes the embedded MiniLM on movie-review sentiment.

``python -m jpeft.cli demo [--method lora|lora-all-linear|bitfit|full] [--steps N] ...``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

METHODS = ("lora", "lora-all-linear", "bitfit", "full")


def build_method(name: str, rank: int = 8, alpha: float = 8.0):
    """The demo's configurations; each trains the classification head alongside the method."""
    import jpeft
    head = jpeft.full_finetune(("classifier",))
    if name == "lora":
        return jpeft.compose(lora=jpeft.lora(("query", "value"), rank=rank, alpha=alpha), head=head)
    if name == "lora-all-linear":
        return jpeft.compose(lora=jpeft.lora("all-linear", rank=rank, alpha=alpha,
                                             exclude=("classifier",)), head=head)
    if name == "bitfit":
        return jpeft.compose(bitfit=jpeft.bitfit(exclude=("classifier",)), head=head)
    if name == "full":
        return jpeft.full_finetune()
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def default_lr(name: str) -> float:
    return {"full": 5e-5}.get(name, 2e-3 if name.startswith("lora") else 5e-3)


def demo(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    import optax

    import jpeft
    from jpeft import checkpoint
    from jpeft.data.embedded import minilm_dir
    from jpeft.data.movies import load_movie_reviews, train_dev_split
    from jpeft.models.loading import load_hf_bert
    from jpeft.models.tokenizer import encode, load_tokenizer
    from jpeft.recipes import classification as clf

    t0 = time.perf_counter()
    model_dir = minilm_dir()
    print(f"jpeft {jpeft.__version__} | jax {jax.__version__} on {jax.devices()[0].platform} "
          f"| model: {model_dir}")
    loaded = load_hf_bert(model_dir, num_labels=2, pooling="mean")
    model, variables = loaded.model, {"params": loaded.params}
    tok = load_tokenizer(model_dir / "tokenizer.json", max_length=args.seq)
    texts, labels = load_movie_reviews()
    (tr_x, tr_y), (dev_x, dev_y) = train_dev_split(texts, labels, dev_fraction=0.1, seed=args.seed)
    if args.dev_limit:
        dev_x, dev_y = dev_x[:args.dev_limit], dev_y[:args.dev_limit]
    train_split = clf.Split(encode(tok, tr_x), tr_y)
    dev_split = clf.Split(encode(tok, dev_x), dev_y)
    print(f"data: movie-review sentences, {len(train_split)} train / {len(dev_split)} dev, "
          f"{100 * labels.mean():.1f}% positive; sequence length {args.seq}")

    buckets = tuple(b for b in (16, 24, 32, 48, 64, 96, 128) if b < args.seq) + (args.seq,)
    method = build_method(args.method, args.rank, args.alpha)
    delta = method.init(jax.random.key(args.seed), variables)
    print(f"method: {args.method}  {json.dumps(method.config, default=str)}")
    print(jpeft.param_report(variables, delta))

    predict = clf.make_predict(model.apply, method)
    before = clf.accuracy(clf.logits_of(predict, variables, delta, dev_split, buckets=buckets), dev_y)
    print(f"dev accuracy before fine-tuning: {100 * before:.2f}%")

    lr = args.lr or default_lr(args.method)

    def adamw(peak):
        warmup = max(1, args.steps // 10)
        return optax.adamw(optax.warmup_cosine_decay_schedule(0.0, peak, warmup, args.steps),
                           weight_decay=0.0)
    parts = method.config.get("compose", {})
    optimizer = (jpeft.partition({n: adamw(args.head_lr if n == "head" else lr) for n in parts},
                                 method) if parts else adamw(lr))
    loss_fn = clf.make_loss(model.apply, method)
    result = clf.train(variables, delta, loss_fn, optimizer, train_split, steps=args.steps,
                       batch_size=args.batch, seed=args.seed, progress=not args.no_progress,
                       buckets=buckets)
    delta = result.delta
    dev_logits = clf.logits_of(predict, variables, delta, dev_split, buckets=buckets)
    after = clf.accuracy(dev_logits, dev_y)
    print(f"dev accuracy after {args.steps} steps (batch {args.batch}, lr {lr}, head lr {args.head_lr}): {100 * after:.2f}% "
          f"(before: {100 * before:.2f}%); training took {result.seconds:.1f} s "
          f"({result.seconds / args.steps:.3f} s/step)")

    out = Path(args.out).absolute()
    ckpt = checkpoint.save(out / "delta", delta, metadata={"method": args.method,
                                                           "config": method.config},
                           overwrite=True)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    print(f"saved the delta (only the delta: {size / 1e6:.2f} MB on disk, base weights "
          f"{jpeft.num_bytes(variables) / 1e6:.1f} MB) to {ckpt}")

    # Reload: base weights from the model files again, delta from the checkpoint, nothing reused.
    fresh = load_hf_bert(model_dir, num_labels=2, pooling="mean")
    fresh_vars = {"params": fresh.params}
    fresh_method = build_method(args.method, args.rank, args.alpha)
    like = jax.eval_shape(fresh_method.init, jax.random.key(0), fresh_vars)
    restored = checkpoint.restore(ckpt, like)["delta"]
    fresh_predict = clf.make_predict(fresh.model.apply, fresh_method)
    reloaded = clf.logits_of(fresh_predict, fresh_vars, restored, dev_split, buckets=buckets)
    same = bool(np.array_equal(reloaded, dev_logits))
    print(f"reloaded delta: predictions identical to the trained model: {same} "
          f"(max |logit diff| {np.abs(reloaded - dev_logits).max():.2e})")

    merged = method.merge(variables, delta)
    merged_logits = clf.logits_of(clf.make_predict(model.apply), merged, None, dev_split,
                                  buckets=buckets)
    agree = float(np.mean(np.argmax(merged_logits, -1) == np.argmax(dev_logits, -1)))
    print(f"merged model: {100 * agree:.2f}% of dev predictions equal to the unmerged model "
          f"(max |logit diff| {np.abs(merged_logits - dev_logits).max():.2e}); "
          f"merged accuracy {100 * clf.accuracy(merged_logits, dev_y):.2f}%")
    total = time.perf_counter() - t0
    print(f"total time {total:.1f} s")
    ok = same and agree == 1.0
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
    d.add_argument("--dev-limit", type=int, default=0, help="evaluate on the first N dev examples")
    d.add_argument("--out", default=os.path.join("runs", "demo"))
    d.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
