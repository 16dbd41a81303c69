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
