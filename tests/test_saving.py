"""jpeft.save / jpeft.load: every method and composition rebuilt by name from its checkpoint alone."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from conftest import perturb

import jpeft
from jpeft import checkpoint, saving
from jpeft.core import sparse
from jpeft.methods import adapters, far, prefix, prompt, sparse_adapter, unipelt

from jpeft.models.bert import BertForSequenceClassification
from jpeft.models.loading import model_record


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
    checkpoint.save(path, delta, metadata={"kind": saving.KIND, "name": "lora", "config": config,
                                           "user": {}})


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


# The model record: what the delta was trained on beyond the weights' shapes (issue: an adapter
# trained with mean pooling ran silently on a CLS-pooling base, logits off by up to 3.94).


def _head_lora(variables, sites):
    method = jpeft.compose(lora=jpeft.lora(("query", "value"), rank=2),
                           head=jpeft.full_finetune(("classifier",)))
    return method, perturb(method.init(jax.random.key(0), variables, sites), scale=0.2)


def _cls_base(config):
    """The tiny classifier with ``pooling="cls"`` (the default of load_hf_bert): the same
    encoder and head shapes as the mean-pooled one, plus a pooler."""
    model = BertForSequenceClassification(dataclasses.replace(config, pooling="cls"))
    return model, {"params": model.init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]}


def test_a_mean_pooled_adapter_refuses_a_cls_base(bert, tiny_config, tmp_path):
    model, variables, sites, batch = bert
    method, delta = _head_lora(variables, sites)
    jpeft.save(tmp_path / "m", method, delta, model=model_record(model))
    cls_model, cls_variables = _cls_base(tiny_config)
    # The delta fits the CLS base (same shapes), and would run there with other logits.
    run = lambda m, v: jpeft.wrap(m.apply, method, sites)(v, delta, **batch)
    assert not np.allclose(run(cls_model, cls_variables), run(model, variables), atol=1e-2)
    with pytest.raises(checkpoint.CheckpointError, match=(
            r"was trained on another model than the base given: its delta would compute another"
            r" function .*\n  pooling: saved 'mean', found 'cls'\nbuild the base as recorded: "
            r"jpeft\.models\.load_hf_bert\(model_dir, pooling='mean'\)$")):
        jpeft.load(tmp_path / "m", cls_variables, sites, model=model_record(cls_model))
    with pytest.raises(checkpoint.CheckpointError, match=(
            r"records the model its delta was trained on \(loader='load_hf_bert', with_head=True"
            r".*pooling='mean'.*\); pass model= the record of the base")):
        jpeft.load(tmp_path / "m", cls_variables, sites)

    loaded = jpeft.load(tmp_path / "m", variables, sites, model=model_record(model))
    assert loaded.model == model_record(model) and loaded.metadata == {"model": loaded.model}
    np.testing.assert_array_equal(jpeft.wrap(model.apply, loaded.method, sites)(
        variables, loaded.delta, **batch), run(model, variables))


@pytest.mark.parametrize("change,line", [
    (dict(num_labels=3), "num_labels: saved 2, found 3"),
    (dict(hidden_act="relu"), "hidden_act: saved 'gelu', found 'relu'"),
    (dict(layer_norm_eps=1e-6), "layer_norm_eps: saved 1e-12, found 1e-06"),
    (dict(hidden_size=64, intermediate_size=128), "hidden_size: saved 32, found 64"),
    (dict(num_hidden_layers=3), "num_hidden_layers: saved 2, found 3"),
    (dict(vocab_size=90), "vocab_size: saved 100, found 90"),
])
def test_every_recorded_choice_is_checked(bert, tiny_config, tmp_path, change, line):
    model, variables, sites, batch = bert
    method, delta = _head_lora(variables, sites)
    jpeft.save(tmp_path / "m", method, delta, model=model_record(model))
    other = BertForSequenceClassification(dataclasses.replace(tiny_config, **change))
    hint = ", ".join(f"{k}={getattr(tiny_config, k)!r}" for k in sorted(change))
    with pytest.raises(checkpoint.CheckpointError,
                       match="(?s)" + re.escape(line) + ".*"
                       + re.escape(f"load_hf_bert(model_dir, {hint})")):
        jpeft.load(tmp_path / "m", variables, sites, model=model_record(other))


def test_the_record_holds_what_changes_the_function_only(tiny_config):
    import jax.numpy as jnp
    from jpeft.models.bert import BertModel
    record = model_record(BertForSequenceClassification(tiny_config))
    assert record["pooling"] == "mean" and record["num_labels"] == 2 and record["with_head"]
    assert record["dtype"] == record["param_dtype"] == "float32"
    # Dropout acts in training only: the record (and the check) ignore it.
    no_dropout = dataclasses.replace(tiny_config, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    assert model_record(BertForSequenceClassification(no_dropout)) == record
    assert model_record(BertForSequenceClassification(tiny_config, dtype=jnp.bfloat16))[
        "dtype"] == "bfloat16"
    encoder = model_record(BertModel(tiny_config))
    assert not encoder["with_head"] and "num_labels" not in encoder
    saving.check_model(record, dict(record), "x")        # equal records pass
    saving.check_model(None, record, "x")                # nothing recorded: nothing to check


def test_a_record_that_is_not_one_is_refused(bert, tmp_path):
    model, variables, sites, batch = bert
    method, delta = _head_lora(variables, sites)
    with pytest.raises(TypeError, match="the model record is .*expected a JSON object of str"):
        jpeft.save(tmp_path / "m", method, delta, model={"pooling": ["mean"]})
    with pytest.raises(ValueError, match="model=.* and metadata\\['model'\\]=.* differ"):
        jpeft.save(tmp_path / "m", method, delta, model={"pooling": "mean"},
                   metadata={"model": {"pooling": "cls"}})


# One on-disk layout: jpeft.checkpoint.restore reads what jpeft.save writes, and each reader says
# what a directory holds when it does not fit.


def test_checkpoint_restore_reads_a_jpeft_save_directory(bert, tmp_path):
    model, variables, sites, batch = bert
    method = _far(variables, sites)
    delta = perturb(method.init(jax.random.key(0), variables, sites))
    jpeft.save(tmp_path / "m", method, delta, metadata={"task": "x"})
    like = jax.eval_shape(lambda k: method.init(k, variables, sites), jax.random.key(0))
    got = checkpoint.restore(tmp_path / "m", like)
    jax.tree.map(np.testing.assert_array_equal, got["delta"], delta)
    assert got["metadata"]["user"] == {"task": "x"} and got["metadata"]["name"] == "far"
    data = checkpoint.restore(tmp_path / "m", like,
                              data_like=checkpoint.stored_like(tmp_path / "m", "data"))["data"]
    jax.tree.map(np.testing.assert_array_equal, data, method.data)


def test_jpeft_load_of_a_bare_checkpoint_says_what_it_holds(bert, tmp_path):
    model, variables, sites, batch = bert
    method = jpeft.lora(("query", "value"), rank=2)
    checkpoint.save(tmp_path / "bare", method.init(jax.random.key(0), variables, sites))
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(
            f"{tmp_path / 'bare'} was not written by jpeft.save: it holds a bare delta of 8 arrays "
            f"that looks like lora (leaves lora_A, lora_B) (written by jpeft.checkpoint.save, "
            f"without a method config); there is no method to rebuild. Restore it with "
            f"jpeft.checkpoint.restore(path, template)")):
        jpeft.load(tmp_path / "bare", variables, sites)


def test_a_checkpoint_of_the_layout_before_still_loads(bert, tmp_path):
    """jpeft.save wrote ``{"delta": delta, "data": data}`` as the delta item before."""
    model, variables, sites, batch = bert
    method = _far(variables, sites)
    delta = perturb(method.init(jax.random.key(0), variables, sites))
    config = json.loads(json.dumps(method.config))
    checkpoint.save(tmp_path / "old", {"delta": delta, "data": method.data},
                    metadata={"kind": checkpoint.NESTED_KIND, "config": config,
                              "user": {"task": "x"}})
    loaded = jpeft.load(tmp_path / "old", variables, sites)
    jax.tree.map(np.testing.assert_array_equal, loaded.delta, delta)
    assert loaded.metadata == {"task": "x"} and loaded.method.name == "far"
