"""jpeft.save / jpeft.load: every method and composition rebuilt by name from its checkpoint alone."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from conftest import perturb

import jpeft
from jpeft import checkpoint
from jpeft.core import sparse
from jpeft.methods import adapters, far, prefix, prompt, sparse_adapter, unipelt

from jpeft.models.bert import BertForSequenceClassification


def _far(v, sites):
    return jpeft.far(far.far_select(far.far_magnitude_scores(v, far.BERT_FFN, sites=sites), 0.25))


def _sparse(v, sites, kind):
    scores = jax.tree.map(lambda x: np.abs(np.asarray(x)), v)
    idx = sparse.top_k_indices(scores, density=0.01)
    return jpeft.fishmask(idx) if kind == "fishmask" else jpeft.sparse_finetune(idx)


def _sparse_adapter(v, sites):
    dense = adapters.bottleneck((adapters.FFN_SEQUENTIAL,), bottleneck_size=8)
    scoring = sparse_adapter.scoring_init(dense, jax.random.key(0), v, sites)
    return sparse_adapter.sparse_adapter(sparse_adapter.prune_masks(scoring, 0.5),
                                         bottleneck_size=8)


#: name -> (variables, sites) -> method: every kind of method, data-defined ones included.
METHODS = {
    "lora": lambda v, s: jpeft.lora(("query", "value"), rank=2, alpha=4.0, use_rslora=True),
    "adalora": lambda v, s: jpeft.adalora(init_r=3, target_r=2, total_steps=10),
    "bitfit": lambda v, s: jpeft.bitfit(),
    "diff_pruning": lambda v, s: jpeft.diff_pruning(exclude=("classifier",)),
    "said": lambda v, s: jpeft.said(20, exclude=("classifier",)),
    "houlsby": lambda v, s: jpeft.houlsby(bottleneck_size=4),
    "compacter": lambda v, s: jpeft.compacter(reduction_factor=8),
    "ia3": lambda v, s: jpeft.ia3(),
    "prefix": lambda v, s: prefix.prefix_tuning(3, reparametrize=True, hidden_size=8),
    "prompt": lambda v, s: prompt.prompt_tuning(2),
    "sparse_adapter": _sparse_adapter,
    "far": _far,
    "sparse": lambda v, s: _sparse(v, s, "sparse"),
    "fishmask": lambda v, s: _sparse(v, s, "fishmask"),
    "lora+bitfit": lambda v, s: jpeft.compose(lora=jpeft.lora(rank=2), bitfit=jpeft.bitfit(
        exclude=("query", "value"))),
    "far+head": lambda v, s: jpeft.compose(far=_far(v, s),
                                           head=jpeft.full_finetune(("classifier",))),
    "unipelt": lambda v, s: unipelt.unipelt(prefix_length=2, reduction_factor=8),
    "mam": lambda v, s: jpeft.mam_adapter(prefix_length=2, bottleneck_size=8),
}


@pytest.fixture
def bert(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    return model, {"params": params}, tiny_sites, tiny_batch


#: Methods whose outputs are compared after the round trip (the data-defined ones, whose rebuild
#: goes beyond the config, and one composition); the others compare config and delta, which
#: determine the method (from_config is exercised on every preset by tests/test_presets.py).
RUN = ("far", "fishmask", "far+head")


@pytest.mark.parametrize("name", METHODS)
def test_load_rebuilds_the_method_by_name(bert, name, tmp_path):
    model, variables, sites, batch = bert
    method = METHODS[name](variables, sites)
    delta = perturb(method.init(jax.random.key(0), variables, sites), scale=0.05)
    jpeft.save(tmp_path / "m", method, delta, step=7, metadata={"task": "x"})
    loaded = jpeft.load(tmp_path / "m", variables, sites)
    as_json = lambda c: json.loads(json.dumps(c))
    assert as_json(loaded.method.config) == as_json(method.config)
    assert loaded.step == 7 and loaded.metadata == {"task": "x"}
    jax.tree.map(np.testing.assert_array_equal, loaded.delta, delta)
    if name in RUN:
        run = lambda m, d: jpeft.wrap(model.apply, m, sites)(variables, d, **batch)
        np.testing.assert_array_equal(run(loaded.method, loaded.delta), run(method, delta))


def test_a_checkpoint_for_another_base_is_one_clear_error(bert, tiny_config, tmp_path):
    model, variables, sites, batch = bert
    method = jpeft.lora(("query", "value"), rank=2)
    jpeft.save(tmp_path / "m", method, method.init(jax.random.key(0), variables, sites))
    wider = dataclasses.replace(tiny_config, hidden_size=2 * tiny_config.hidden_size,
                                intermediate_size=2 * tiny_config.intermediate_size)
    other = BertForSequenceClassification(wider)
    other_v = {"params": other.init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]}
    ids = np.ones((2, 5), np.int32)
    other_sites = jpeft.probe(other.apply, other_v, ids, ids, np.zeros_like(ids))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"does not fit method 'lora' on the given params \(another base "
                             r"model\?\):\n  params/bert/encoder/layer/0/attention/self/"
                             r"query/kernel/lora_A: checkpoint has \(32, 2\) float32, the method "
                             r"on these params \(64, 2\) float32"):
        jpeft.load(tmp_path / "m", other_v, other_sites)


def test_load_needs_a_saved_method(tmp_path):
    checkpoint.save(tmp_path / "plain", {"w": np.zeros(3, np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match="was not written by jpeft.save"):
        jpeft.load(tmp_path / "plain", {})
    with pytest.raises(ValueError, match="'far' is defined by data .* pass from_config"):
        jpeft.methods.from_config({"method": "far", "train_bias": True, "bias_name": "bias"})


def test_an_empty_delta_is_refused(tmp_path):
    with pytest.raises(ValueError, match="the delta of 'bitfit' holds no arrays"):
        jpeft.save(tmp_path / "m", jpeft.bitfit(), {})


# A config read back is checked against the method's declared fields: one clear error.


def _lora_config(**changes):
    config = json.loads(json.dumps(jpeft.lora(("query", "value"), rank=2, alpha=16.0).config))
    config.update(changes)
    return config


def _without(config, key):
    return {k: v for k, v in config.items() if k != key}


def _write(path, config, variables, sites):
    """A checkpoint as jpeft.save writes one, holding ``config`` as the method's config."""
    delta = jpeft.lora(("query", "value"), rank=2).init(jax.random.key(0), variables, sites)
    checkpoint.save(path, {"delta": delta},
                    metadata={"kind": "jpeft-method", "config": config, "user": {}})


@pytest.mark.parametrize("config,key,value,expected", [
    (_lora_config(rank="abc"), "rank", r"'abc' \(str\)", "expected an int"),
    (_lora_config(rank=2.0), "rank", r"2\.0 \(float\)", "expected an int"),
    (_lora_config(rank=True), "rank", r"True \(bool\)", "expected an int"),
    (_lora_config(targets=123), "targets", r"123 \(int\)",
     r"expected a regular expression \(str, RE2 syntax\) or a list of str or null"),
    (_lora_config(use_rslora="false"), "use_rslora", r"'false' \(str\)",
     r"expected a bool \(true or false\)"),
    (_lora_config(alpha="16"), "alpha", r"'16' \(str\)", "expected a number"),
    (_lora_config(layers_to_transform={"0": 1}), "layers_to_transform", r"{'0': 1} \(object\)",
     "expected an int or a list of int or null"),
    (_lora_config(exclude=[1, 2]), "exclude", r"\[1, 2\] \(list\)", "expected"),
    (_lora_config(targets="(?=q)query"), "targets", r"'\(\?=q\)query' \(str\)",
     r"expected a regular expression .*not RE2 syntax \(invalid perl operator"),
    ({"compose": {"lora": _lora_config(rank="abc")}}, "compose.lora.rank", r"'abc' \(str\)",
     "expected an int"),
    ({"compose": [_lora_config()]}, "compose", r"\[\{.*\(list\)", "expected an object {str: an object}"),
    ([_lora_config()], None, r"\[\{'method': 'lora'.*\(list\)", "expected a JSON object"),
])
def test_a_config_value_of_the_wrong_type_is_one_clear_error(bert, tmp_path, config, key, value,
                                                             expected):
    model, variables, sites, batch = bert
    _write(tmp_path / "m", config, variables, sites)
    import re
    where = re.escape(f"checkpoint {tmp_path / 'm'} (jpeft.save's method config): ")
    named = rf"key '{re.escape(key)}' is " if key else "the config is "
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{where}{named}{value}; {expected}"):
        jpeft.load(tmp_path / "m", variables, sites)


@pytest.mark.parametrize("config,message", [
    (_without(_lora_config(), "alpha"), r"required key 'alpha' is missing \(expected a number\)"),
    (_without(_lora_config(), "use_rslora"), "required key 'use_rslora' is missing"),
    ({"compose": {"lora": _without(_lora_config(), "rank")}},
     "required key 'compose.lora.rank' is missing"),
    (_lora_config(rank_pattern={"value": 4}), r"unknown keys \['rank_pattern'\]"),
    (_lora_config(method="loha"), "key 'method' is 'loha', which no jpeft method is"),
])
def test_a_missing_or_unknown_key_is_an_error_not_a_default(bert, tmp_path, config, message):
    """jpeft.save writes every field: a saved alpha of 16 never comes back as the default 8."""
    model, variables, sites, batch = bert
    _write(tmp_path / "m", config, variables, sites)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        jpeft.load(tmp_path / "m", variables, sites)
    _write(tmp_path / "ok", _lora_config(), variables, sites)
    assert jpeft.load(tmp_path / "ok", variables, sites).method.config["alpha"] == 16.0


def test_a_pathological_target_pattern_from_a_file_does_not_hang(bert, tmp_path):
    from deadline import within
    model, variables, sites, batch = bert
    _write(tmp_path / "m", _lora_config(targets="(.*.*)*Z"), variables, sites)
    with pytest.raises(ValueError, match=r"targets '\(\.\*\.\*\)\*Z' matched none of the"):
        within(5.0, jpeft.load, tmp_path / "m", variables, sites)
