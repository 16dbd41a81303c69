"""Fine-tune a sequence classifier with any jpeft method: the main job behind ``make demo``.

The pieces are plain functions so that the preset recipe (:mod:`jpeft.recipes.finetune`, behind
``jpeft demo --method ...``) and the tests reuse them: encode the data once, build the loss, train
for a number of steps with a progress bar, evaluate, predict. :class:`ClassifierEnv` bundles them
into the environment the method presets run in (:class:`jpeft.presets.Env`).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft.core import method as method_lib
from jpeft.core import train as train_lib
from jpeft.methods import fishmask as fishmask_lib
from jpeft.recipes import quantization as quant_lib

Batch = dict[str, np.ndarray]


class Split(NamedTuple):
    """Encoded examples: ``inputs`` maps names to int32 ``[N, T]``, ``labels`` is int32 ``[N]``."""
    inputs: Batch
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def bucket_length(lengths: np.ndarray, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds the longest of ``lengths`` (the largest bucket otherwise)."""
    longest = int(np.max(lengths)) if len(lengths) else 1
    return next((b for b in sorted(buckets) if b >= longest), max(buckets))


def _take(split: Split, idx: np.ndarray, batch_size: int, buckets: tuple[int, ...] | None) -> Batch:
    weight = np.ones(len(idx), np.float32)
    if len(idx) < batch_size:
        pad = batch_size - len(idx)
        idx = np.concatenate([idx, np.full(pad, idx[0], idx.dtype)])
        weight = np.concatenate([weight, np.zeros(pad, np.float32)])
    batch = {k: v[idx] for k, v in split.inputs.items()}
    if buckets:
        width = bucket_length(batch["attention_mask"].sum(1), buckets)
        batch = {k: v[:, :width] for k, v in batch.items()}
    batch["labels"] = split.labels[idx]
    batch["weight"] = weight
    return batch


def batches(split: Split, batch_size: int, *, seed: int | None = None, drop_last: bool = True,
            buckets: tuple[int, ...] | None = None, group_by_length: bool = False
            ) -> Iterator[Batch]:
    """Batches of ``split`` with ``"labels"`` and ``"weight"`` added.

    Args:
      split: the examples, right-padded to a common length ``T``.
      batch_size: rows per batch; every batch has exactly this many (one compiled shape per bucket).
      seed: shuffle with this seed (``None``: keep the order).
      drop_last: drop the incomplete last batch; otherwise it is padded by repeating a row with
        ``weight`` 0.
      buckets: cut each batch to the smallest of these lengths that holds its longest example, so
        short sentences do not pay for ``T`` (a handful of compiled shapes instead of one).
      group_by_length: with ``seed``, sort each window of 32 shuffled batches by length and then
        shuffle the batches, so that a batch holds examples of similar length (as Hugging Face's
        ``group_by_length``); the set of examples per epoch is unchanged.
    """
    n = len(split)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    if group_by_length and seed is not None:
        lengths = split.inputs["attention_mask"].sum(1)
        window = 32 * batch_size
        order = np.concatenate([
            chunk[np.argsort(lengths[chunk], kind="stable")]
            for chunk in np.split(order, range(window, n, window))])
    stop = n - n % batch_size if drop_last else n
    starts = list(range(0, stop, batch_size))
    if group_by_length and seed is not None:
        np.random.default_rng(seed + 1).shuffle(starts)
    for start in starts:
        yield _take(split, order[start:start + batch_size], batch_size, buckets)


def endless(split: Split, batch_size: int, seed: int, **kwargs) -> Iterator[Batch]:
    """Shuffled batches forever; pass ``e`` uses seed ``seed + e`` (``kwargs`` go to :func:`batches`)."""
    epoch = 0
    while True:
        yield from batches(split, batch_size, seed=seed + epoch, **kwargs)
        epoch += 1


def make_loss(apply_fn: Callable[..., Any], method: method_lib.Method, sites: Any = None, *,
              mode: str = "factored", dropout: bool = True):
    """Weighted cross-entropy of a classifier; returns ``(loss, {"accuracy": ...})`` (the method's
    own penalty is added by :func:`jpeft.make_train_step` given the method).

    ``apply_fn(params, input_ids, attention_mask, token_type_ids, deterministic=..., rngs=...)`` is
    the model's apply (``sites`` its contraction sites, :func:`jpeft.probe`); the key drives model
    dropout and the method's own dropout.
    """
    f = method_lib.wrap(apply_fn, method, sites, mode=mode)

    def loss(params, delta, batch, key):
        model_key, delta_key = jax.random.split(key)
        logits = f(params, delta, batch["input_ids"], batch["attention_mask"],
                   batch["token_type_ids"], deterministic=not dropout,
                   rngs={"dropout": model_key}, delta_rng=delta_key if dropout else None)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        w = batch["weight"]
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        metrics = {"accuracy": jnp.sum(correct * w) / jnp.sum(w)}
        return jnp.sum(nll * w) / jnp.sum(w), metrics
    return loss


def make_predict(apply_fn: Callable[..., Any], method: method_lib.Method | None = None,
                 sites: Any = None):
    """``predict(params, delta, batch) -> logits`` (jitted, deterministic).

    With ``method=None`` the delta argument is ignored and the plain model runs (e.g. on merged
    parameters).
    """
    if method is None:
        return _plain_predict(apply_fn)

    def predict(params, delta, batch):
        args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        return method_lib.wrap(apply_fn, method, sites)(params, delta, *args)
    return jax.jit(predict)


@functools.lru_cache(maxsize=16)
def _plain_predict(apply_fn: Callable[..., Any]):
    """The jitted plain model, one per apply function (compiled once per shape, e.g. for the base
    model and then for merged parameters)."""
    def predict(params, delta, batch):
        del delta
        return apply_fn(params, batch["input_ids"], batch["attention_mask"],
                        batch["token_type_ids"])
    return jax.jit(predict)


def logits_of(predict, params, delta, split: Split, batch_size: int = 128,
              buckets: tuple[int, ...] | None = None) -> np.ndarray:
    """Logits ``[N, C]`` for every example of ``split``, in the split's order.

    With ``buckets`` the examples run sorted by length, each batch cut to its bucket.
    """
    lengths = split.inputs["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable") if buckets else np.arange(len(split))
    out = []
    for start in range(0, len(split), batch_size):
        batch = _take(split, order[start:start + batch_size], batch_size, buckets)
        logits = np.asarray(predict(params, delta, batch))
        out.append(logits[batch["weight"] > 0])
    logits = np.concatenate(out)
    result = np.empty_like(logits)
    result[order] = logits
    return result


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, -1) == labels))


class TrainResult(NamedTuple):
    delta: Any
    opt_state: Any
    losses: list[float]
    seconds: float


def train(params: Any, delta: Any, loss_fn, optimizer: optax.GradientTransformation,
          split: Split, *, steps: int, batch_size: int, seed: int = 0,
          progress: bool = True, opt_state: Any = None, start_step: int = 0,
          buckets: tuple[int, ...] | None = None,
          method: method_lib.Method | None = None) -> TrainResult:
    """Run ``steps`` steps of :func:`jpeft.make_train_step` over shuffled batches of ``split``
    (with ``method``'s training additions folded in: its penalty and optimizer wrapper).

    With ``buckets``, batches group examples of similar length and are cut to a bucket length
    (see :func:`batches`). The batch order and the per-step keys depend only on ``seed`` and the step number, so a run
    resumed at ``start_step`` from a checkpoint continues exactly.
    """
    step_fn = train_lib.make_train_step(loss_fn, optimizer, method=method)
    if opt_state is None:
        opt_state = train_lib.init_opt_state(optimizer, delta, method=method)
    per_epoch = len(split) // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(split)} training examples")
    stream = endless(split, batch_size, seed, buckets=buckets, group_by_length=bool(buckets))
    for _ in range(start_step):
        next(stream)
    losses: list[float] = []
    bar = None
    if progress:
        from jpeft.recipes.progress import Progress      # a bar on a terminal, lines otherwise
        bar = Progress(steps, "fine-tuning")
    start = time.perf_counter()
    key = jax.random.key(seed)
    for i in range(start_step, start_step + steps):
        delta, opt_state, metrics = step_fn(params, delta, opt_state, next(stream),
                                            jax.random.fold_in(key, i))
        losses.append(float(metrics["loss"]))
        if bar is not None:
            bar.update(1, loss=float(np.mean(losses[-20:])))
    jax.block_until_ready(delta)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return TrainResult(delta, opt_state, losses, seconds)


class ClassifierEnv(NamedTuple):
    """A sequence classifier and its data as the environment of a method preset
    (:class:`jpeft.presets.Env`, plus what :func:`jpeft.recipes.finetune.run` needs to evaluate and
    reload).

    ``apply_fn(params, input_ids, attention_mask, token_type_ids, deterministic=..., rngs=...)`` is
    the model's apply, ``params`` its base tree and ``sites`` its contraction sites; ``train`` and
    ``dev`` are encoded splits. Training runs ``batch`` examples per step, cut to ``buckets``
    (``None``: the full length); evaluation runs ``eval_batch`` examples per call. ``head`` names
    the head modules trained alongside every method. ``reload() -> params`` reads the base weights
    again from their source (default: a host copy of ``params``). ``quantize`` says how ``params``
    is stored (:mod:`jpeft.recipes.quantization`: ``"none"``, ``"nf4"``, ``"int8"``;
    :meth:`quantized` sets it). ``model_record`` is the base model's record
    (:func:`jpeft.models.loading.model_record`: pooling, head, config, dtypes), saved with the
    result and checked when it is loaded again (``None``: not recorded).
    """
    apply_fn: Callable[..., Any]
    params: Any
    sites: Any
    train: Split
    dev: Split
    batch: int = 32
    buckets: tuple[int, ...] | None = None
    head: tuple[str, ...] = ("classifier",)
    progress: bool = False
    log: Callable[[str], None] = print
    reload: Callable[[], Any] | None = None
    eval_batch: int = 128
    quantize: str = "none"
    model_record: dict | None = None

    def fit(self, method: method_lib.Method, delta: Any, *, steps: int,
            optimizer: optax.GradientTransformation, mode: str = "factored",
            seed: int = 0) -> TrainResult:
        """:func:`train` on the training split with :func:`make_loss` (dropout on)."""
        loss_fn = make_loss(self.apply_fn, method, self.sites, mode=mode)
        return train(self.params, delta, loss_fn, optimizer, self.train, steps=steps,
                     batch_size=self.batch, seed=seed, progress=self.progress,
                     buckets=self.buckets, method=method)

    def examples(self, n: int, seed: int) -> Batch:
        """The first ``n`` training examples of a seeded permutation (a fixed data order), cut to
        the smallest bucket that holds the longest of them, with their ``"labels"``."""
        if n < 1:
            raise ValueError(f"examples: n must be at least 1, got {n}")
        order = np.random.default_rng(seed).permutation(len(self.train))[:n]
        mask = self.train.inputs["attention_mask"][order]
        width = bucket_length(mask.sum(1), self.buckets) if self.buckets else mask.shape[1]
        out = {k: v[order, :width] for k, v in self.train.inputs.items()}
        out["labels"] = self.train.labels[order]
        return out

    def log_likelihood(self, params: Any, example: Batch) -> jax.Array:
        """``log p(label | example)`` of one example (no batch axis), deterministic."""
        logits = lambda p, ex: self.apply_fn(p, ex["input_ids"][None], ex["attention_mask"][None],
                                             ex["token_type_ids"][None])[0]
        return fishmask_lib.label_log_likelihood(logits)(params, example)

    def evaluate(self, method: method_lib.Method | None, params: Any, delta: Any
                 ) -> tuple[np.ndarray, float]:
        """Dev logits ``[N, C]`` and accuracy; ``method=None`` runs the plain model on
        ``params``."""
        predict = make_predict(self.apply_fn, method, self.sites)
        logits = logits_of(predict, params, delta, self.dev, batch_size=self.eval_batch,
                           buckets=self.buckets)
        return logits, accuracy(logits, self.dev.labels)

    def base_params(self) -> Any:
        """The base weights read again (nothing shared with ``params``)."""
        if self.reload is not None:
            return self.reload()
        return jax.tree.map(lambda x: np.array(x, copy=True), self.params)

    def quantized(self, scheme: str) -> "ClassifierEnv":
        """This environment on its base stored as ``scheme`` (:func:`jpeft.recipes.quantization.
        prepare`: the linear weights quantized, the apply function dequantizing them, the sites
        probed again on two training examples); ``reload`` reads the weights again and quantizes
        them the same way. ``"none"``: this environment.

        Raises:
          ValueError: an unknown scheme, or a base that is already quantized.
        """
        if quant_lib.check(scheme) == "none":
            return self
        if self.quantize != "none":
            raise ValueError(f"ClassifierEnv.quantized: the base is already stored "
                             f"{self.quantize}; quantize a full-precision environment")
        ex = self.examples(2, 0)
        base = quant_lib.prepare(self.apply_fn, self.params, self.sites,
                                 (ex["input_ids"], ex["attention_mask"], ex["token_type_ids"]),
                                 scheme)
        reload, sites = self.reload, self.sites
        again = None if reload is None else lambda: quant_lib.quantize(reload(), sites, scheme)
        return self._replace(apply_fn=base.apply, params=base.params, sites=base.sites,
                             reload=again, quantize=scheme)

    def one_shape(self) -> "ClassifierEnv":
        """This environment with one padded length (the longest bucket) instead of length buckets:
        every batch shape compiles the train step again, one shape compiles it once."""
        return self._replace(buckets=(max(self.buckets),)) if self.buckets else self
