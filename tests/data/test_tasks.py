"""The six shipped classification tasks: parsing (the SMS file's quoting fault included),
deduplication, and fixed seeded splits."""

import numpy as np
import pytest

from conftest import unavailable

from jpeft.data import tasks


@pytest.fixture(scope="module")
def loaded():
    try:
        return {name: tasks.load(name) for name in tasks.TASKS}
    except (ModuleNotFoundError, FileNotFoundError) as e:
        unavailable(str(e))


#: (examples after deduplication, per-label counts), counted from the files.
COUNTS = {
    "movies": (10_566, [5_325, 5_241]),
    "tweets": (4_196, [1_299, 2_897]),
    "amazon": (3_600, [1_480, 2_120]),
    "nyt": (4_878, [2_700, 2_178]),
    "sms": (5_171, [4_518, 653]),
    "trec": (5_381, [86, 1_153, 1_245, 1_215, 824, 858]),
}


def test_every_task_counts_labels_and_texts(loaded):
    assert tuple(loaded) == tasks.TASKS
    for name, data in loaded.items():
        n, per_label = COUNTS[name]
        assert len(data) == len(data.labels) == n, name
        assert data.labels.dtype == np.int32
        assert np.bincount(data.labels, minlength=data.num_labels).tolist() == per_label, name
        assert len(set(data.texts)) == n, name                     # deduplicated
        assert all(isinstance(t, str) and t.strip() for t in data.texts), name
    assert loaded["trec"].label_names == tasks.TREC_CLASSES
    assert loaded["sms"].label_names == ("ham", "spam")


def test_sms_file_splits_back_into_the_original_collection(loaded):
    """The shipped CSV's unbalanced quotes swallow original ``ham<TAB>...`` lines; split out, the
    file holds the SMS Spam Collection's 5,574 messages: 4,827 ham and 747 spam."""
    del loaded
    texts, labels = tasks.parse_sms(tasks.data_path("sms-spam.csv").read_text(encoding="utf-8"))
    assert len(texts) == 5_574
    assert np.bincount(labels).tolist() == [4_827, 747]
    assert not any("\tham" in t or t.startswith(("ham\t", "spam\t")) for t in texts)
    assert max(len(t.split()) for t in texts) < 200     # no swallowed blocks of messages


def test_parse_sms_splits_swallowed_lines_and_keeps_continuations():
    text = (',spam,text\n'
            '0,0,"Keep in touch"" gdeve..\nham\tOk then\nspam\tWIN a prize\nsecond line"\n'
            '1,1,Plain spam\n')
    texts, labels = tasks.parse_sms(text)
    assert texts == ['Keep in touch" gdeve..', "Ok then", "WIN a prize\nsecond line",
                     "Plain spam"]
    assert labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="header"):
        tasks.parse_sms("a,b,c\n0,0,x\n")
    with pytest.raises(ValueError, match="row 2"):
        tasks.parse_sms(",spam,text\n0,2,x\n")


def test_parse_trec_and_its_errors():
    texts, labels = tasks.parse_trec("NUM:date When was it ?\nHUM:ind Who did it ?\n\n")
    assert texts == ["When was it ?", "Who did it ?"]
    assert labels.tolist() == [tasks.TREC_CLASSES.index("NUM"), tasks.TREC_CLASSES.index("HUM")]
    with pytest.raises(ValueError, match="line 1"):
        tasks.parse_trec("FOO:bar What ?\n")


def test_deduplicate_keeps_first_and_drops_conflicts():
    texts, labels = tasks.deduplicate(["a", "b", "a", "c", "b"], [1, 0, 1, 1, 1])
    assert texts == ["a", "c"] and labels.tolist() == [1, 1]


def test_splits_are_fixed_disjoint_and_sized(loaded):
    data = loaded["tweets"]
    s = tasks.split(data, seed=0, test=300, dev=200, train=1000)
    again = tasks.split(data, seed=0, test=300, dev=200, train=1000)
    assert (len(s.train.texts), len(s.dev.texts), len(s.test.texts)) == (1000, 200, 300)
    assert all(a.texts == b.texts and np.array_equal(a.labels, b.labels)
               for a, b in zip(s, again))
    parts = [set(p.texts) for p in s]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    lookup = dict(zip(data.texts, data.labels.tolist()))
    assert all(lookup[t] == y for p in s for t, y in zip(p.texts, p.labels.tolist()))
    other = tasks.split(data, seed=1, test=300, dev=200, train=1000)
    assert other.test.texts != s.test.texts
    full = tasks.split(data, seed=0, test=300, dev=200)
    assert len(full.train.texts) == len(data) - 500
    assert full.train.texts[:1000] == s.train.texts         # the cap takes a prefix
    with pytest.raises(ValueError, match="no training example"):
        tasks.split(data, test=len(data), dev=1)
    with pytest.raises(ValueError, match="dev must be at least 1"):
        tasks.split(data, dev=0)
    with pytest.raises(ValueError, match="unknown task 'imdb'"):
        tasks.load("imdb")


def test_subsample_draws_k_without_replacement():
    part = tasks.Split([f"t{i}" for i in range(50)], np.arange(50, dtype=np.int32))
    a, b = tasks.subsample(part, 10, 0), tasks.subsample(part, 10, 1)
    assert len(set(a.texts)) == 10 and a.texts != b.texts
    assert [int(t[1:]) for t in a.texts] == a.labels.tolist()
    with pytest.raises(ValueError, match="k must be in"):
        tasks.subsample(part, 51, 0)
