"""The embedded default task: all-MiniLM-L6-v2 + a classification head on movie-review sentiment.

Shared by ``jpeft demo`` for every method preset: load the model and data once (:func:`load_task`)
and hand them to the preset recipe as its environment (:func:`env`, run by
:func:`jpeft.recipes.finetune.run`); :func:`fine_tune` and :func:`evaluate` serve scripts that train
a method directly (``benchmarks/intrinsic_sweep.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import optax

from jpeft import presets
from jpeft.core import method as method_lib
from jpeft.core.sites import probe
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

    @property
    def model_record(self) -> dict:
        """The base's model record (:func:`jpeft.models.loading.model_record`: mean pooling, the
        2-way head, MiniLM's config), saved with every result of the task."""
        from jpeft.models.loading import model_record
        return model_record(self.model)


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


#: The optimizer every preset trains with unless it declares its own (kept here under its old name).
make_optimizer = presets.default_optimizer


def env(task: Task, *, batch: int = 32, progress: bool = True,
        log: Callable[[str], None] = print) -> clf.ClassifierEnv:
    """``task`` as the environment of a method preset (:class:`jpeft.presets.Env`): the head is
    ``("classifier",)``, batches of ``batch`` cut to the task's length buckets, the reload
    check reads the base weights again from the model files (:func:`fresh_variables`), and the
    result records the model (:attr:`Task.model_record`)."""
    return clf.ClassifierEnv(task.model.apply, task.variables, task.sites, task.train, task.dev,
                             batch=batch, buckets=task.buckets, head=("classifier",),
                             progress=progress, log=log, reload=lambda: fresh_variables(task),
                             model_record=task.model_record)


def single_shape(task: Task) -> Task:
    """``task`` with one padded length (its longest bucket) instead of length buckets.

    Every new batch shape recompiles the train step; a single shape compiles once. Short sentences
    then pay for the padding, which costs less than recompiling where the step is expensive to
    compile (SAID/DID's projections, about 10 s each time on a CPU).
    """
    return task._replace(buckets=(max(task.buckets),))


def merged_accuracy(task: Task, method: method_lib.Method, delta: Any
                    ) -> tuple[np.ndarray, float]:
    """Dev logits and accuracy of ``apply(merge(params, delta))`` with the merge done once (jitted):
    the fastest form where the factored one projects or gathers at every batch."""
    merged = jax.jit(lambda p, d: method.merge(p, d, task.sites))(task.variables, delta)
    return evaluate(task, None, merged, None)


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
    optimizer = optimizer or presets.default_optimizer(method, steps, lr, head_lr)
    loss_fn = clf.make_loss(task.model.apply, method, task.sites, mode=mode)
    return clf.train(task.variables, delta, loss_fn, optimizer, task.train, steps=steps,
                     batch_size=batch, seed=seed, progress=progress, buckets=task.buckets,
                     method=method)
