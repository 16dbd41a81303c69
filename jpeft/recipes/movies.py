"""The embedded default task: all-MiniLM-L6-v2 + a classification head on movie-review sentiment.

Shared by ``jpeft demo`` for every method: load the model and data once (:func:`load_task`), build
the optimizer, fine-tune, evaluate, and check that a saved delta reloads to identical predictions
and that merging changes nothing (:func:`check_save_reload_merge`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax

from jpeft import checkpoint
from jpeft.core import method as method_lib
from jpeft.core.sites import probe
from jpeft.core import train as train_lib
from jpeft.core import tree as tree_lib
from jpeft.recipes import classification as clf


class Task(NamedTuple):
    """The loaded default task. ``variables = {"params": ...}`` of a ``BertForSequenceClassification``;
    ``sites`` its contraction sites (:func:`jpeft.probe`)."""
    model_dir: Path
    model: Any
    variables: Any
    train: clf.Split
    dev: clf.Split
    buckets: tuple[int, ...]
    sites: Any


def load_task(seq: int = 64, seed: int = 0, dev_limit: int = 0, dev_fraction: float = 0.1) -> Task:
    """MiniLM with mean pooling and a 2-way head; sentences tokenised to ``seq`` tokens; a seeded
    train/dev split (``dev_limit`` > 0 keeps the first ``dev_limit`` dev examples)."""
    from jpeft.data.embedded import minilm_dir
    from jpeft.data.movies import load_movie_reviews, train_dev_split
    from jpeft.models.loading import load_hf_bert
    from jpeft.models.tokenizer import encode, load_tokenizer

    model_dir = minilm_dir()
    loaded = load_hf_bert(model_dir, num_labels=2, pooling="mean")
    tok = load_tokenizer(model_dir / "tokenizer.json", max_length=seq)
    texts, labels = load_movie_reviews()
    (tr_x, tr_y), (dev_x, dev_y) = train_dev_split(texts, labels, dev_fraction, seed=seed)
    if dev_limit:
        dev_x, dev_y = dev_x[:dev_limit], dev_y[:dev_limit]
    buckets = tuple(b for b in (16, 24, 32, 48, 64, 96, 128) if b < seq) + (seq,)
    variables = {"params": loaded.params}
    train = clf.Split(encode(tok, tr_x), tr_y)
    example = {k: v[:2] for k, v in train.inputs.items()}
    sites = probe(loaded.model.apply, variables, example["input_ids"], example["attention_mask"],
                  example["token_type_ids"])
    return Task(model_dir, loaded.model, variables, train, clf.Split(encode(tok, dev_x), dev_y),
                buckets, sites)


def fresh_variables(task: Task) -> Any:
    """The base weights read again from the model files (nothing shared with ``task.variables``)."""
    from jpeft.models.loading import load_hf_bert
    return {"params": load_hf_bert(task.model_dir, num_labels=2, pooling="mean").params}


def make_optimizer(method: method_lib.Method, steps: int, lr: float,
                   head_lr: float | None = None) -> optax.GradientTransformation:
    """AdamW with 10% linear warm-up and cosine decay; the ``head`` part of a composed method gets
    ``head_lr``."""
    def adamw(peak):
        warmup = max(1, steps // 10)
        return optax.adamw(optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps),
                           weight_decay=0.0)
    parts = method.config.get("compose", {})
    if not parts:
        return adamw(lr)
    return train_lib.partition(
        {n: adamw(head_lr if (n == "head" and head_lr) else lr) for n in parts}, method)


def evaluate(task: Task, method: method_lib.Method | None, params: Any, delta: Any
             ) -> tuple[np.ndarray, float]:
    """Dev logits ``[N, 2]`` and accuracy; ``method=None`` runs the plain model on ``params``."""
    predict = clf.make_predict(task.model.apply, method, task.sites)
    logits = clf.logits_of(predict, params, delta, task.dev, buckets=task.buckets)
    return logits, clf.accuracy(logits, task.dev.labels)


def fine_tune(task: Task, method: method_lib.Method, delta: Any, *, steps: int, batch: int,
              lr: float, head_lr: float | None = None, seed: int = 0, progress: bool = True,
              mode: str = "factored",
              optimizer: optax.GradientTransformation | None = None) -> clf.TrainResult:
    """Train ``delta`` on the task's training split (the method's own penalty and optimizer
    wrapper, e.g. AdaLoRA's, are folded in)."""
    optimizer = optimizer or make_optimizer(method, steps, lr, head_lr)
    loss_fn = clf.make_loss(task.model.apply, method, task.sites, mode=mode)
    return clf.train(task.variables, delta, loss_fn, optimizer, task.train, steps=steps,
                     batch_size=batch, seed=seed, progress=progress, buckets=task.buckets,
                     method=method)


def check_save_reload_merge(task: Task, method: method_lib.Method, delta: Any, dev_logits: np.ndarray,
                            out: str | Path, *, rebuild: Callable[[], method_lib.Method],
                            metadata: dict | None = None, like: Any = None,
                            log: Callable[[str], None] = print) -> bool:
    """Save ``delta``; reload base weights and delta from disk into a freshly built method and
    compare the dev predictions bit for bit; compare the merged model's predictions.

    ``like`` is the abstract delta to restore into (default: ``eval_shape`` of the rebuilt
    method's ``init``). Returns whether both checks hold.
    """
    ckpt = checkpoint.save(Path(out).absolute() / "delta", delta,
                           metadata={"config": method.config, "sites": task.sites.to_json(),
                                     **(metadata or {})}, overwrite=True)
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    log(f"saved the delta (only the delta: {size / 1e6:.2f} MB on disk; base weights "
        f"{tree_lib.num_bytes(task.variables) / 1e6:.1f} MB) to {ckpt}")

    fresh_vars = fresh_variables(task)
    fresh_method = rebuild()
    if like is None:
        like = jax.eval_shape(lambda k, p: fresh_method.init(k, p, task.sites), jax.random.key(0),
                              fresh_vars)
    restored = checkpoint.restore(ckpt, like)["delta"]
    reloaded, _ = evaluate(task, fresh_method, fresh_vars, restored)
    same = bool(np.array_equal(reloaded, dev_logits))
    log(f"reloaded base + delta from disk: predictions identical to the trained model: {same} "
        f"(max |logit diff| {np.abs(reloaded - dev_logits).max():.2e})")

    merged = method.merge(task.variables, delta, task.sites)
    merged_logits, merged_acc = evaluate(task, None, merged, None)
    agree = float(np.mean(np.argmax(merged_logits, -1) == np.argmax(dev_logits, -1)))
    log(f"merged model: {100 * agree:.2f}% of dev predictions equal to the unmerged model "
        f"(max |logit diff| {np.abs(merged_logits - dev_logits).max():.2e}); "
        f"merged accuracy {100 * merged_acc:.2f}%")
    return same and agree == 1.0

