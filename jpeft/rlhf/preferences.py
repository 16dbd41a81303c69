"""Where the preferences come from: a sentiment classifier trained with jpeft, judging pairs of
sampled continuations (the classic "positive review" RLHF example).

**The classifier** (:func:`train_classifier`) is the demo's model: the embedded all-MiniLM-L6-v2
with mean pooling and a 2-way head, a LoRA on query and value plus the head trained with jpeft on
the labelled movie-review sentences (seeded 90/10 split). Its probability of "positive"
(:func:`positive_probability`) is the ground-truth reward the RLHF steps are measured with.

**Pairs** (:func:`make_pairs`): for each prompt, two continuations sampled from the SFT model
(the RLHF base) are scored by the classifier; the higher-scored is ``chosen``, the other
``rejected``. Pairs whose two scores differ by less than ``min_gap`` are dropped (a coin-flip
label teaches nothing). The reward model and DPO train on the same pairs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

import jpeft
from jpeft.core import method as method_lib
from jpeft.recipes import classification as clf
from jpeft.rlhf import generate as gen_lib


class Classifier(NamedTuple):
    """The trained sentiment classifier: the BERT ``apply`` and its base ``variables``
    (``{"params": ...}``), ``sites``, the jpeft ``method`` and ``delta`` trained on it, the
    ``tokenizer`` (truncating and padding to ``seq`` tokens), the model ``record`` saved with the
    delta and the dev-set ``accuracy`` (``nan`` when not measured)."""
    apply: Callable[..., Any]
    variables: Any
    sites: Any
    method: method_lib.Method
    delta: Any
    tokenizer: Any
    record: dict
    accuracy: float


def classifier_method(rank: int = 8, alpha: float = 16.0) -> method_lib.Method:
    """LoRA on query and value plus the classification head (``compose(lora=..., head=...)``, as
    the demo's ``lora`` preset)."""
    return jpeft.compose(lora=jpeft.lora(("query", "value"), rank=rank, alpha=alpha),
                         head=jpeft.full_finetune(("classifier",), name="head"))


def _minilm(seq: int):
    from jpeft.data.embedded import minilm_dir
    from jpeft.models.loading import load_hf_bert
    from jpeft.models.tokenizer import load_tokenizer
    model_dir = minilm_dir()
    loaded = load_hf_bert(model_dir, num_labels=2, pooling="mean")
    tok = load_tokenizer(model_dir / "tokenizer.json", max_length=seq)
    variables = {"params": loaded.params}
    ex = np.zeros((2, seq), np.int32)
    sites = jpeft.probe(loaded.model.apply, variables, ex, np.ones_like(ex), ex)
    return loaded, tok, variables, sites


def _split(tok, texts: Sequence[str], labels: np.ndarray) -> clf.Split:
    from jpeft.models.tokenizer import encode
    return clf.Split(encode(tok, list(texts)), np.asarray(labels, np.int32))


def train_classifier(*, steps: int = 150, batch: int = 32, seq: int = 32, lr: float = 1e-3,
                     head_lr: float = 1e-2, train_examples: int | None = None,
                     dev_examples: int = 512, seed: int = 0,
                     log: Callable[[str], None] = print) -> Classifier:
    """The classifier of the module docstring, trained ``steps`` steps of ``batch`` sentences
    (tokenized to ``seq`` tokens; ``train_examples`` caps the training split) with AdamW on a
    warm-up + cosine schedule (``lr`` for the LoRA, ``head_lr`` for the head); its accuracy is
    measured on the first ``dev_examples`` dev sentences (0: not measured)."""
    from jpeft.data.movies import load_movie_reviews, train_dev_split
    from jpeft.presets import default_optimizer
    loaded, tok, variables, sites = _minilm(seq)
    (tr_x, tr_y), (dev_x, dev_y) = train_dev_split(*load_movie_reviews(), 0.1, seed=seed)
    if train_examples:
        tr_x, tr_y = tr_x[:train_examples], tr_y[:train_examples]
    train = _split(tok, tr_x, tr_y)
    method = classifier_method()
    delta = method.init(jax.random.key(seed), variables, sites)
    loss = clf.make_loss(loaded.model.apply, method, sites, dropout=False)
    result = clf.train(variables, delta, loss, default_optimizer(method, steps, lr, head_lr),
                       train, steps=steps, batch_size=min(batch, len(train)), seed=seed,
                       progress=False, method=method)
    accuracy = math.nan
    if dev_examples:
        dev = _split(tok, dev_x[:dev_examples], dev_y[:dev_examples])
        predict = clf.make_predict(loaded.model.apply, method, sites)
        accuracy = clf.accuracy(clf.logits_of(predict, variables, result.delta, dev,
                                              batch_size=128), dev.labels)
    log(f"sentiment classifier (MiniLM + LoRA q,v + head): {steps} steps, loss "
        f"{np.mean(result.losses[:5]):.3f} -> {np.mean(result.losses[-5:]):.3f}, dev accuracy "
        f"{accuracy:.3f} ({len(dev_x[:dev_examples])} sentences)")
    return Classifier(loaded.model.apply, variables, sites, method, result.delta, tok,
                      loaded.record, accuracy)


def save_classifier(directory: str | Path, classifier: Classifier) -> None:
    """``jpeft.save`` of the classifier's delta (with its model record and accuracy)."""
    jpeft.save(directory, classifier.method, classifier.delta, model=classifier.record,
               metadata={"accuracy": classifier.accuracy}, overwrite=True)


def load_classifier(directory: str | Path, *, seq: int = 32) -> Classifier:
    """The classifier saved by :func:`save_classifier` on a freshly loaded MiniLM."""
    loaded, tok, variables, sites = _minilm(seq)
    saved = jpeft.load(directory, variables, sites, model=loaded.record)
    return Classifier(loaded.model.apply, variables, sites, saved.method, saved.delta, tok,
                      loaded.record, float(saved.metadata.get("accuracy", math.nan)))


def positive_probability(classifier: Classifier, texts: Sequence[str], *,
                         batch: int = 128) -> np.ndarray:
    """``P(positive | text)`` for each text, ``[N]`` float32 (batches of ``batch``, the last one
    padded: one compiled shape)."""
    if not len(texts):
        return np.zeros((0,), np.float32)
    split = _split(classifier.tokenizer, texts, np.zeros(len(texts), np.int32))
    predict = clf.make_predict(classifier.apply, classifier.method, classifier.sites)
    logits = clf.logits_of(predict, classifier.variables, classifier.delta, split,
                           batch_size=batch)
    return np.asarray(jax.nn.softmax(logits, axis=-1)[:, 1], np.float32)


# --------------------------------------------------------------------------------------------
# Pairs


class Pairs(NamedTuple):
    """Preference pairs on prompts of ``prompt_length`` (left-padded) bytes: ``chosen``,
    ``rejected`` ``[N, P + R]`` int32 (prompt then response), their masks (1 on real prompt bytes
    and response tokens), and each side's classifier score ``[N]`` (``chosen_score >=
    rejected_score``)."""
    chosen: np.ndarray
    chosen_mask: np.ndarray
    rejected: np.ndarray
    rejected_mask: np.ndarray
    chosen_score: np.ndarray
    rejected_score: np.ndarray
    prompt_length: int

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    def take(self, idx: Any) -> "Pairs":
        """The pairs at ``idx``."""
        return Pairs(*(x[idx] for x in self[:6]), self.prompt_length)

    def completion_mask(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` with the prompt columns zeroed: 1 on the response tokens only."""
        out = np.array(mask, copy=True)
        out[:, :self.prompt_length] = 0
        return out


def sample_in_chunks(generator: Callable[..., gen_lib.Rollout], params: Any, delta: Any,
                     ids: np.ndarray, mask: np.ndarray, key: jax.Array, *,
                     chunk: int) -> gen_lib.Rollout:
    """``generator`` over ``ids, mask [N, P]`` in chunks of ``chunk`` rows (the last one padded
    by repeating its first row: one compiled shape), chunk ``i`` with ``fold_in(key, i)``."""
    parts = []
    for i, start in enumerate(range(0, len(ids), chunk)):
        rows = np.arange(start, min(start + chunk, len(ids)))
        idx = np.concatenate([rows, np.full(chunk - len(rows), rows[0])])
        r = generator(params, delta, ids[idx], mask[idx], jax.random.fold_in(key, i))
        parts.append(jax.tree.map(lambda x, n=len(rows): np.asarray(x)[:n], r))
    return gen_lib.Rollout(*(np.concatenate(xs) for xs in zip(*parts)))


def make_pairs(generator: Callable[..., gen_lib.Rollout], params: Any, ids: np.ndarray,
               mask: np.ndarray, score: Callable[[list[str]], np.ndarray], key: jax.Array, *,
               min_gap: float = 0.0, chunk: int = 128) -> tuple[Pairs, dict]:
    """Two continuations of each prompt ``ids, mask [N, P]`` by ``generator`` (the base:
    ``generator(params, None, ...)``), scored by ``score(texts) -> [N]`` (the classifier's
    positive probability); the higher is chosen. Returns the pairs whose scores differ by at
    least ``min_gap`` and a summary (``prompts``, ``kept``, the mean scores and gap)."""
    both_ids = np.concatenate([ids, ids])
    both_mask = np.concatenate([mask, mask])
    rollout = sample_in_chunks(generator, params, None, both_ids, both_mask, key, chunk=chunk)
    scores = np.asarray(score(gen_lib.texts_of(rollout)), np.float32)
    n = len(ids)
    a, b = np.arange(n), np.arange(n, 2 * n)
    first = scores[a] >= scores[b]
    ci, ri = np.where(first, a, b), np.where(first, b, a)
    keep = np.abs(scores[a] - scores[b]) >= min_gap
    ci, ri = ci[keep], ri[keep]
    tokens, full_mask = np.asarray(rollout.tokens), np.asarray(rollout.mask)
    pairs = Pairs(tokens[ci], full_mask[ci], tokens[ri], full_mask[ri], scores[ci], scores[ri],
                  int(ids.shape[1]))
    summary = {"prompts": n, "kept": len(pairs), "mean_score": float(scores.mean()),
               "mean_gap": float(np.mean(scores[ci] - scores[ri])) if len(pairs) else 0.0}
    return pairs, summary


def save_pairs(path: str | Path, pairs: Pairs) -> None:
    """The pairs as one ``.npz``."""
    np.savez(path, **{k: v for k, v in pairs._asdict().items() if k != "prompt_length"},
             prompt_length=np.int64(pairs.prompt_length))


def load_pairs(path: str | Path) -> Pairs:
    """The pairs written by :func:`save_pairs`."""
    with np.load(path) as z:
        return Pairs(*(z[k] for k in Pairs._fields[:6]), int(z["prompt_length"]))


__all__ = ["Classifier", "Pairs", "classifier_method", "load_classifier", "load_pairs",
           "make_pairs", "positive_probability", "sample_in_chunks", "save_classifier",
           "save_pairs", "train_classifier"]
