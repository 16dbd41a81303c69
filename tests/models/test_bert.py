import dataclasses
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import require

from jpeft.models.bert import (BertConfig, BertForSequenceClassification, BertModel, EncoderOutput,
                               attention_bias, get_activation, masked_mean)
from jpeft.models.loading import hf_state_to_flax
from jpeft.models.tokenizer import encode


def _paths(params):
    return set(traverse_util.flatten_dict(params, sep="/"))


def _expected_base_paths(num_layers, with_pooler):
    paths = {f"embeddings/{n}/embedding"
             for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    paths |= {"embeddings/LayerNorm/scale", "embeddings/LayerNorm/bias"}
    for i in range(num_layers):
        p = f"encoder/layer/{i}"
        for dense in ("attention/self/query", "attention/self/key", "attention/self/value",
                      "attention/output/dense", "intermediate/dense", "output/dense"):
            paths |= {f"{p}/{dense}/kernel", f"{p}/{dense}/bias"}
        for ln in ("attention/output/LayerNorm", "output/LayerNorm"):
            paths |= {f"{p}/{ln}/scale", f"{p}/{ln}/bias"}
    if with_pooler:
        paths |= {"pooler/dense/kernel", "pooler/dense/bias"}
    return paths


def _init(model, batch, key=0):
    return model.init(jax.random.key(key), batch["input_ids"])["params"]


def _apply(model, params, batch, **kw):
    return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"], **kw)


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_param_tree_mirrors_hugging_face_names(pooling, tiny_batch):
    config = BertConfig.tiny(pooling=pooling)
    base = _init(BertModel(config), tiny_batch)
    assert _paths(base) == _expected_base_paths(config.num_hidden_layers, pooling == "cls")

    cls_params = _init(BertForSequenceClassification(config), tiny_batch)
    expected = {f"bert/{p}" for p in _expected_base_paths(2, pooling == "cls")}
    assert _paths(cls_params) == expected | {"classifier/kernel", "classifier/bias"}
    assert cls_params["classifier"]["kernel"].shape == (config.hidden_size, config.num_labels)
    layer = cls_params["bert"]["encoder"]["layer"]["1"]
    assert layer["intermediate"]["dense"]["kernel"].shape == (32, 64)  # [in, out]
    assert layer["output"]["dense"]["kernel"].shape == (64, 32)


def test_every_linear_map_is_a_flax_dense(tiny_batch):
    config = BertConfig.tiny(pooling="cls")
    model = BertForSequenceClassification(config)
    params = _init(model, tiny_batch)
    seen = []

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.append("/".join(context.module.scope.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        _apply(model, params, tiny_batch)
    # 6 per layer (q, k, v, attention output, intermediate, output) + pooler + classifier.
    assert len(seen) == 6 * config.num_hidden_layers + 2
    dense_params = {p.rsplit("/", 1)[0] for p in _paths(params) if p.endswith("kernel")}
    assert set(seen) == dense_params


def test_hf_initialisers(tiny_config, tiny_bert):
    _, params = tiny_bert
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, x in flat.items():
        if path.endswith("LayerNorm/scale"):
            np.testing.assert_array_equal(x, 1.0)
        elif path.endswith("bias"):
            np.testing.assert_array_equal(x, 0.0)
    words = flat["bert/embeddings/word_embeddings/embedding"]
    kernels = np.concatenate([np.ravel(x) for p, x in flat.items() if p.endswith("kernel")])
    for x in (words, kernels):
        assert abs(float(np.std(x)) - tiny_config.initializer_range) < 0.002
        assert abs(float(np.mean(x))) < 0.002


# --------------------------------------------------------------------------- config


def test_config_from_hf_json(tmp_path):
    hf = {"architectures": ["BertForSequenceClassification"], "hidden_size": 48,
          "num_attention_heads": 6, "num_hidden_layers": 3, "intermediate_size": 96,
          "hidden_act": "gelu_new", "vocab_size": 50, "max_position_embeddings": 40,
          "type_vocab_size": 1, "layer_norm_eps": 1e-7, "hidden_dropout_prob": 0.2,
          "attention_probs_dropout_prob": 0.3, "pad_token_id": 1,
          "id2label": {"0": "a", "1": "b", "2": "c"}, "model_type": "bert"}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    c = BertConfig.from_json_file(tmp_path / "config.json", pooling="mean")
    for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
              "hidden_act", "vocab_size", "max_position_embeddings", "type_vocab_size",
              "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
              "pad_token_id"):
        assert getattr(c, k) == hf[k], k
    assert c.num_labels == 3 and c.pooling == "mean" and c.head_dim == 8
    assert BertConfig.from_dict(hf, num_labels=5).num_labels == 5


@pytest.mark.parametrize("bad,message", [
    (dict(hidden_act="tanhh"), "unsupported hidden_act 'tanhh'; expected one of"),
    (dict(pooling="max"), r"pooling must be one of \('cls', 'mean'\) or None, got 'max'"),
    (dict(hidden_size=30, num_attention_heads=4),
     "hidden_size 30 is not a multiple of num_attention_heads 4")])
def test_config_rejects_invalid_values(bad, message):
    with pytest.raises(ValueError, match=message):
        BertConfig.tiny(**bad)


def test_activations():
    x = jnp.linspace(-4.0, 4.0, 41)
    exact = 0.5 * x * (1.0 + jax.scipy.special.erf(x / math.sqrt(2.0)))
    tanh = 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(get_activation("gelu")(x), exact, atol=1e-6)
    np.testing.assert_allclose(get_activation("gelu_new")(x), tanh, atol=1e-6)
    assert float(jnp.max(jnp.abs(get_activation("gelu")(x) - get_activation("gelu_new")(x)))) > 1e-4
    np.testing.assert_array_equal(get_activation("relu")(x), jnp.maximum(x, 0.0))


def test_attention_bias_and_masked_mean():
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    bias = attention_bias(mask, jnp.float32)
    assert bias.shape == (2, 1, 1, 3)
    np.testing.assert_array_equal(bias[:, 0, 0], [[0, 0, np.finfo(np.float32).min],
                                                   [0, np.finfo(np.float32).min,
                                                    np.finfo(np.float32).min]])
    h = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    np.testing.assert_allclose(masked_mean(h, mask), [[1.0, 2.0], [6.0, 7.0]])


# --------------------------------------------------------------------------- behaviour


def test_output_shapes(tiny_config, tiny_bert, tiny_batch):
    model, params = tiny_bert
    b, t = tiny_batch["input_ids"].shape
    h = tiny_config.hidden_size
    out = _apply(BertModel(tiny_config), params["bert"], tiny_batch, output_hidden_states=True)
    assert isinstance(out, EncoderOutput)
    assert out.last_hidden_state.shape == (b, t, h) and out.pooled.shape == (b, h)
    assert len(out.hidden_states) == tiny_config.num_hidden_layers + 1
    assert all(x.shape == (b, t, h) for x in out.hidden_states)
    np.testing.assert_array_equal(out.hidden_states[-1], out.last_hidden_state)
    np.testing.assert_allclose(out.pooled, masked_mean(out.last_hidden_state,
                                                       tiny_batch["attention_mask"]), atol=1e-6)
    assert _apply(BertModel(tiny_config), params["bert"], tiny_batch).hidden_states is None
    assert _apply(model, params, tiny_batch).shape == (b, tiny_config.num_labels)

    no_pool = dataclasses.replace(tiny_config, pooling=None)
    assert _apply(BertModel(no_pool), params["bert"], tiny_batch).pooled is None


def test_defaults_for_mask_and_token_types(tiny_config, tiny_bert, tiny_batch):
    _, params = tiny_bert
    model = BertModel(tiny_config)
    ids = tiny_batch["input_ids"]
    full = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids)}
    default = model.apply({"params": params["bert"]}, ids)
    np.testing.assert_array_equal(default.last_hidden_state,
                                  _apply(model, params["bert"], full).last_hidden_state)


def test_padding_invariance(tiny_config, tiny_bert, tiny_batch):
    model, params = tiny_bert
    base = BertModel(tiny_config)
    mask = tiny_batch["attention_mask"].astype(bool)
    changed = dict(tiny_batch)
    noise = np.random.default_rng(1).integers(1, tiny_config.vocab_size, size=mask.shape)
    changed["input_ids"] = np.where(mask, tiny_batch["input_ids"], noise).astype(np.int32)
    changed["token_type_ids"] = np.where(mask, tiny_batch["token_type_ids"], 1).astype(np.int32)
    assert not np.array_equal(changed["input_ids"], tiny_batch["input_ids"])

    a = _apply(base, params["bert"], tiny_batch, output_hidden_states=True)
    b = _apply(base, params["bert"], changed, output_hidden_states=True)
    for x, y in zip(a.hidden_states[1:], b.hidden_states[1:]):
        np.testing.assert_allclose(np.asarray(x)[mask], np.asarray(y)[mask], atol=1e-6)
    np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-6)
    np.testing.assert_allclose(_apply(model, params, tiny_batch), _apply(model, params, changed),
                               atol=1e-6)
    # ...while the outputs at padded positions do see the change (the test is not vacuous).
    assert not np.allclose(np.asarray(a.last_hidden_state)[~mask],
                           np.asarray(b.last_hidden_state)[~mask])


def test_dropout_only_when_not_deterministic(tiny_bert, tiny_batch):
    model, params = tiny_bert
    eval_a = _apply(model, params, tiny_batch)
    eval_b = _apply(model, params, tiny_batch, deterministic=True)
    np.testing.assert_array_equal(eval_a, eval_b)

    train = lambda k: _apply(model, params, tiny_batch, deterministic=False,
                             rngs={"dropout": jax.random.key(k)})
    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), eval_a)
    with pytest.raises(Exception, match="dropout"):
        _apply(model, params, tiny_batch, deterministic=False)


def test_zero_dropout_train_equals_eval(tiny_config, tiny_bert, tiny_batch):
    _, params = tiny_bert
    config = dataclasses.replace(tiny_config, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    np.testing.assert_allclose(_apply(model, params, tiny_batch),
                               _apply(model, params, tiny_batch, deterministic=False,
                                      rngs={"dropout": jax.random.key(0)}), atol=1e-6)


def test_dtype_and_param_dtype(tiny_config, tiny_bert, tiny_batch):
    _, params32 = tiny_bert
    model = BertForSequenceClassification(tiny_config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = _init(model, tiny_batch)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits = _apply(model, params, tiny_batch)
    assert logits.dtype == jnp.bfloat16

    # float32 parameters, bfloat16 computation: close to the float32 result (LayerNorm outputs ~1).
    low = _apply(BertModel(tiny_config, dtype=jnp.bfloat16), params32["bert"], tiny_batch)
    high = _apply(BertModel(tiny_config), params32["bert"], tiny_batch)
    assert low.last_hidden_state.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low.last_hidden_state, np.float32),
                               high.last_hidden_state, atol=0.1)


def test_jit_matches_eager(tiny_bert, tiny_batch):
    model, params = tiny_bert
    jitted = jax.jit(lambda p, b: _apply(model, p, b))
    np.testing.assert_allclose(jitted(params, tiny_batch), _apply(model, params, tiny_batch),
                               atol=1e-6)


# --------------------------------------------------------------------------- PyTorch cross-checks


def _torch_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch = require("torch")
    transformers = require("transformers")
    return torch, transformers


@pytest.mark.torch
def test_minilm_matches_transformers(minilm, monkeypatch):
    torch, transformers = _torch_transformers(monkeypatch)
    from jpeft.data.embedded import minilm_dir

    hf = transformers.BertModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
    texts = ["A gorgeous, witty, seductive movie.", "Bad.",
             "The plot is as predictable as the sunrise, yet somehow the actors keep it afloat.",
             "An utterly charmless waste of two hours, and of a cast that deserved better."]
    batch = encode(minilm.tokenizer, texts)
    mask = batch["attention_mask"].astype(bool)
    assert (~mask).any() and mask.sum(1).min() > 2

    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()},
                 output_hidden_states=True)
    ours = jax.jit(lambda p, b: _apply(BertModel(minilm.config), p, b, output_hidden_states=True))(
        minilm.params["bert"], batch)

    np.testing.assert_allclose(np.asarray(ours.last_hidden_state)[mask],
                               ref.last_hidden_state.numpy()[mask], atol=1e-4, rtol=0)
    assert len(ours.hidden_states) == len(ref.hidden_states) == 7
    for i, (x, y) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
        np.testing.assert_allclose(np.asarray(x)[mask], y.numpy()[mask], atol=1e-4, rtol=0,
                                   err_msg=f"hidden_states[{i}]")
    # Mean pooling is sentence-transformers' (pre-normalisation) sentence embedding.
    m = torch.from_numpy(batch["attention_mask"]).unsqueeze(-1).float()
    st = (ref.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)
    np.testing.assert_allclose(ours.pooled, st.numpy(), atol=1e-4, rtol=0)


@pytest.mark.torch
def test_tiny_classifier_matches_transformers(tiny_batch, monkeypatch):
    torch, transformers = _torch_transformers(monkeypatch)
    hf_config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64,
                                        max_position_embeddings=64, type_vocab_size=2,
                                        num_labels=3, hidden_act="gelu")
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hf_config).eval()
    with torch.no_grad():  # weights far from init, so that every parameter matters
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("bert.pooler.") for k in state)

    config = BertConfig.from_dict(hf_config.to_dict(), pooling="cls")
    assert config.num_labels == 3
    model = BertForSequenceClassification(config)
    params, report = hf_state_to_flax(state, _init(model, tiny_batch), strict=True)
    assert report.missing == () and report.unexpected == ()

    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in tiny_batch.items()}).logits
    np.testing.assert_allclose(_apply(model, params, tiny_batch), ref.numpy(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- rematerialisation


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_layers_keep_the_tree_outputs_and_gradients(tiny_config, tiny_bert, tiny_batch,
                                                          policy):
    """Per-layer rematerialisation changes what the backward pass keeps, not the math: the same
    parameter tree, logits and gradients (LoRA through ``jpeft.wrap`` included), and the layers
    are ``remat`` calls in the program."""
    import jpeft
    model, params = tiny_bert
    remat = BertForSequenceClassification(tiny_config, remat=policy)
    assert _paths(_init(remat, tiny_batch)) == _paths(params)
    args = (tiny_batch["input_ids"], tiny_batch["attention_mask"])
    variables = {"params": params}
    sites = jpeft.probe(model.apply, variables, *args)
    method = jpeft.lora("all-linear", rank=2, alpha=4.0, exclude=("classifier",))
    delta = jax.tree.map(lambda x: x + 0.1, method.init(jax.random.key(1), variables, sites))
    grads = {}
    for name, m in (("plain", model), ("remat", remat)):
        f = jpeft.wrap(m.apply, method, jpeft.probe(m.apply, variables, *args))
        loss = lambda d, f=f: jnp.sum(jnp.tanh(f(variables, d, *args)))
        grads[name] = jax.jit(jax.value_and_grad(loss))(delta)
        prims = {e.primitive.name for e in jax.make_jaxpr(
            lambda p: m.apply(p, *args))(variables).eqns}
        assert ("remat2" in prims) == (name == "remat"), prims
    np.testing.assert_allclose(grads["remat"][0], grads["plain"][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads["remat"][1], grads["plain"][1])


def test_remat_rejects_an_unknown_policy(tiny_config, tiny_batch):
    with pytest.raises(ValueError, match="remat must be None or one of"):
        _init(BertForSequenceClassification(tiny_config, remat="dots"), tiny_batch)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "layer_norm"])
def test_layers_equal_flax_in_values_and_gradients(kind, dtype):
    # jpeft's Dense/LayerNorm differentiate on flattened tokens (jpeft.ops.flat_tokens); the
    # reference is flax's own module, differentiated by autodiff on [B, T, F].
    from jpeft.models.bert import Dense, LayerNorm
    if kind == "dense":
        ours, ref = Dense(7, dtype=dtype), nn.Dense(7, dtype=dtype)
    else:
        ours, ref = LayerNorm(epsilon=1e-12, dtype=dtype), nn.LayerNorm(epsilon=1e-12, dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (3, 5, 6))
    params = ref.init(jax.random.key(1), x)
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
    cot = jax.random.normal(jax.random.key(3), ref.apply(params, x).shape)
    loss = lambda m: lambda p, x: (m.apply(p, x).astype(jnp.float32) * cot).sum()
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(ours.apply(params, x), np.float32),
                               np.asarray(ref.apply(params, x), np.float32), rtol=tol, atol=tol)
    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    want = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    for (kp, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype, jax.tree_util.keystr(kp)
        scale = float(np.abs(np.asarray(w, np.float32)).max())
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   rtol=tol, atol=tol * scale, err_msg=jax.tree_util.keystr(kp))
