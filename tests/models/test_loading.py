import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from jpeft.models.bert import BertConfig, BertForSequenceClassification, BertModel
from jpeft.models.loading import LoadReport, flax_to_hf_state, hf_state_to_flax, load_hf_bert


def _flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _random_like(params, seed):
    """Same structure, independent random values (so a copied value is distinguishable)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), params)


@pytest.fixture(scope="module")
def cls_params():
    """Random (non-init) parameters of a tiny classifier with the pooler (pooling='cls')."""
    model = BertForSequenceClassification(BertConfig.tiny(pooling="cls", num_labels=3))
    return _random_like(model.init(jax.random.key(0), np.ones((1, 4), np.int32))["params"], 1)


def test_hf_names_and_layouts(cls_params):
    state = flax_to_hf_state(cls_params)
    assert len(state) == len(_flat(cls_params))
    w = state["bert.encoder.layer.1.intermediate.dense.weight"]
    assert w.shape == (64, 32) and w.flags.c_contiguous  # torch Linear: [out, in]
    np.testing.assert_array_equal(
        w.T, cls_params["bert"]["encoder"]["layer"]["1"]["intermediate"]["dense"]["kernel"])
    np.testing.assert_array_equal(state["bert.embeddings.word_embeddings.weight"],
                                  cls_params["bert"]["embeddings"]["word_embeddings"]["embedding"])
    np.testing.assert_array_equal(state["bert.encoder.layer.0.output.LayerNorm.weight"],
                                  cls_params["bert"]["encoder"]["layer"]["0"]["output"]["LayerNorm"]["scale"])
    assert state["classifier.weight"].shape == (3, 32)
    assert "bert.pooler.dense.bias" in state


def test_round_trip_is_exact(cls_params):
    target = _random_like(cls_params, 2)
    params, report = hf_state_to_flax(flax_to_hf_state(cls_params), target, strict=True)
    assert report == LoadReport((), (), ())
    _assert_trees_equal(params, cls_params)


def test_round_trip_through_safetensors_file(cls_params, tmp_path):
    save_file(flax_to_hf_state(cls_params), str(tmp_path / "model.safetensors"))
    params, _ = hf_state_to_flax(load_file(str(tmp_path / "model.safetensors")),
                                 _random_like(cls_params, 2), strict=True)
    _assert_trees_equal(params, cls_params)


def test_shape_mismatch_names_key_and_shapes(cls_params):
    state = flax_to_hf_state(cls_params)
    state["bert.encoder.layer.0.attention.self.key.weight"] = np.zeros((32, 31), np.float32)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.key\.weight") as e:
        hf_state_to_flax(state, cls_params)
    msg = str(e.value)
    assert "bert.encoder.layer.0.attention.self.key.weight" in msg
    assert "(32, 31)" in msg and "(32, 32)" in msg

    state = flax_to_hf_state(cls_params)
    state["classifier.weight"] = np.zeros((2, 32), np.float32)  # 2 labels, the model has 3
    with pytest.raises(ValueError, match=r"classifier\.weight.*\(2, 32\).*\(3, 32\)"):
        hf_state_to_flax(state, cls_params, strict=False)


def test_missing_and_unexpected_are_reported(cls_params):
    state = flax_to_hf_state(cls_params)
    del state["classifier.weight"], state["classifier.bias"]
    state["lm_head.dense.weight"] = np.zeros((4, 4), np.float32)
    target = _random_like(cls_params, 2)
    params, report = hf_state_to_flax(state, target)
    assert set(report.missing) == {"classifier/kernel", "classifier/bias"}
    assert report.unexpected == ("lm_head.dense.weight",)
    # Missing leaves keep the target's values; everything else is loaded.
    np.testing.assert_array_equal(params["classifier"]["kernel"], target["classifier"]["kernel"])
    np.testing.assert_array_equal(params["bert"]["pooler"]["dense"]["kernel"],
                                  cls_params["bert"]["pooler"]["dense"]["kernel"])


def test_strict_raises_on_missing_or_unexpected(cls_params):
    state = flax_to_hf_state(cls_params)
    missing = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    with pytest.raises(ValueError, match="classifier/kernel"):
        hf_state_to_flax(missing, cls_params, strict=True)
    extra = dict(state, **{"bert.encoder.layer.7.output.dense.weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.7"):
        hf_state_to_flax(extra, cls_params, strict=True)


def test_position_ids_buffer_is_ignored(cls_params):
    state = flax_to_hf_state(cls_params)
    state["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    params, report = hf_state_to_flax(state, cls_params, strict=True)
    assert report.ignored == ("bert.embeddings.position_ids",) and report.unexpected == ()
    _assert_trees_equal(params, cls_params)


def test_base_checkpoint_loads_under_bert_prefix(cls_params):
    base_state = flax_to_hf_state(cls_params["bert"])
    assert "embeddings.word_embeddings.weight" in base_state
    target = _random_like(cls_params, 2)
    params, report = hf_state_to_flax(base_state, target)
    assert set(report.missing) == {"classifier/kernel", "classifier/bias"}
    assert report.unexpected == ()
    _assert_trees_equal(params["bert"], cls_params["bert"])


def test_classifier_checkpoint_loads_into_base_model(cls_params):
    params, report = hf_state_to_flax(flax_to_hf_state(cls_params),
                                      _random_like(cls_params["bert"], 2))
    assert report.missing == ()
    assert set(report.unexpected) == {"classifier.weight", "classifier.bias"}
    _assert_trees_equal(params, cls_params["bert"])


def test_layer_norm_gamma_beta_and_dtype_cast(cls_params):
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                     "LayerNorm.beta"): v.astype(np.float64)
             for k, v in flax_to_hf_state(cls_params).items()}
    assert any(k.endswith("LayerNorm.gamma") for k in state)
    params, _ = hf_state_to_flax(state, _random_like(cls_params, 2), strict=True)
    _assert_trees_equal(params, cls_params)  # values exact, dtype back to float32

    both = dict(state, **{"bert.embeddings.LayerNorm.weight": state["bert.embeddings.LayerNorm.gamma"]})
    with pytest.raises(ValueError, match="both load into"):
        hf_state_to_flax(both, cls_params)


def test_load_hf_bert_from_directory(cls_params, tmp_path):
    config = BertConfig.tiny(pooling="cls", num_labels=3)
    hf_config = {k: v for k, v in dataclasses.asdict(config).items()
                 if k not in ("pooling", "num_labels", "classifier_dropout")}
    hf_config["id2label"] = {"0": "neg", "1": "neu", "2": "pos"}
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    state = flax_to_hf_state(cls_params)
    state["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    save_file(state, str(tmp_path / "model.safetensors"))

    loaded = load_hf_bert(tmp_path, pooling="cls", strict=True)
    assert loaded.config == config and isinstance(loaded.model, BertForSequenceClassification)
    _assert_trees_equal(loaded.params, cls_params)

    base = load_hf_bert(tmp_path, pooling="mean", with_head=False)
    assert isinstance(base.model, BertModel) and base.config.pooling == "mean"
    assert set(base.report.unexpected) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                           "classifier.weight", "classifier.bias"}
    assert base.report.missing == ()

    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_bert(tmp_path / "nowhere")


def test_minilm_checkpoint_loads_exactly(minilm):
    from jpeft.data.embedded import minilm_dir

    file_state = load_file(str(minilm_dir() / "model.safetensors"))
    ours = flax_to_hf_state(minilm.params["bert"])
    # Mean pooling: the file's pooler is unused, the classifier is new; everything else is exact.
    expected = {k for k in file_state if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    assert set(ours) == expected
    for k in expected:
        np.testing.assert_array_equal(ours[k], file_state[k], err_msg=k)
    assert minilm.config.hidden_size == 384 and minilm.config.num_hidden_layers == 6
    assert minilm.config.pooling == "mean" and minilm.config.num_labels == 2
    assert minilm.params["classifier"]["kernel"].shape == (384, 2)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_pads_and_truncates_to_max_length(minilm):
    from jpeft.data.embedded import minilm_dir
    from jpeft.models.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(minilm_dir() / "tokenizer.json", max_length=16)
    texts = ["A fine film.", "word " * 40, ""]
    batch = encode(tok, texts)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    for v in batch.values():
        assert v.dtype == np.int32 and v.shape == (3, 16)
    cls_id, sep_id, pad_id = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    np.testing.assert_array_equal(mask.sum(1), [6, 16, 2])  # [CLS] a fine film . [SEP]
    assert (ids[:, 0] == cls_id).all() and ids[1, 15] == sep_id and ids[2, 1] == sep_id
    assert (ids[mask == 0] == pad_id).all() and (batch["token_type_ids"] == 0).all()
    # Same ids as the fixture's 64-long tokenizer, cut at the real length.
    full = minilm.tokenizer.encode("A fine film.")
    assert ids[0, :6].tolist() == full.ids[:6]
    assert encode(tok, [])["input_ids"].shape == (0, 16)
    with pytest.raises(TypeError, match="encode expects a sequence of strings, not a single string"):
        encode(tok, "a single string")


def test_model_record_of_bert_and_llama(cls_params, tmp_path):
    """The record holds what changes the function (pooling, head, config, dtypes), not dropout
    or the initialiser's scale; the hint rebuilds the recorded base."""
    import jax.numpy as jnp
    from flax import nnx

    from jpeft.models.llama import LlamaConfig, LlamaForCausalLM
    from jpeft.models.loading import model_record, rebuild_hint
    config = BertConfig.tiny(pooling="cls", num_labels=3)
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    save_file(flax_to_hf_state(cls_params), str(tmp_path / "model.safetensors"))
    loaded = load_hf_bert(tmp_path, pooling="mean", num_labels=3)
    record = loaded.record
    assert record["loader"] == "load_hf_bert" and record["with_head"]
    assert record["pooling"] == "mean" and record["num_labels"] == 3
    assert "hidden_dropout_prob" not in record and "initializer_range" not in record
    assert load_hf_bert(tmp_path, pooling="mean", num_labels=3,
                        hidden_dropout_prob=0.0).record == record
    assert load_hf_bert(tmp_path, pooling="cls", num_labels=3).record["pooling"] == "cls"
    assert rebuild_hint(record, ["pooling", "num_labels"]) == (
        "jpeft.models.load_hf_bert(model_dir, pooling='mean', num_labels=3)")

    llama = nnx.eval_shape(lambda: LlamaForCausalLM(LlamaConfig.tiny(), dtype=jnp.bfloat16))
    record = model_record(llama)
    assert record["loader"] == "load_hf_llama" and record["dtype"] == "bfloat16"
    assert "rope_theta" in record and "scan_layers" not in record
    assert rebuild_hint(record, ["rope_theta", "dtype"]) == (
        f"jpeft.models.load_hf_llama(source, config=dataclasses.replace(config, "
        f"rope_theta={record['rope_theta']!r}), dtype=jnp.bfloat16)")
    with pytest.raises(TypeError, match="has no dataclass config"):
        model_record(object())
