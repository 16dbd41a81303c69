"""Prompt and prefix tuning against Hugging Face PEFT in PyTorch: the same prompt / prefix values
in both, the same logits (BERT classifier with padding; LLaMA decoder with grouped-query
attention)."""

import jax
import numpy as np
import pytest

import jpeft
from conftest import hf_llama, require, torch_transformers
from jpeft.core import paths as paths_lib
from jpeft.methods import prefix as prefix_lib
from jpeft.methods import prompt as prompt_lib
from jpeft.models.llama import LlamaConfig, load_hf_llama

pytestmark = pytest.mark.torch

L = 3


def _hf_prefix_weight(delta, atts):
    """jpeft prefixes ``{scope: [l, K, D]}`` -> PEFT's ``[l, layers * 2 * K * D]`` (layer-major,
    key before value)."""
    flat = paths_lib.flatten(delta)
    rows = []
    for a in atts:
        k, v = flat[a.scope + ("prefix_keys",)], flat[a.scope + ("prefix_values",)]
        rows += [np.asarray(k).reshape(L, -1), np.asarray(v).reshape(L, -1)]
    return np.concatenate(rows, axis=1)


def _peft(torch, peft, hf, config, weight):
    model = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(weight.copy()))
    return model


# (Prefix tuning on BERT: this transformers' BERT takes no past_key_values, so PEFT cannot run it;
# tests/methods/test_prefix.py checks it against attention written by hand.)
@pytest.mark.parametrize("kind", ["prompt"])
def test_bert_classifier_matches_peft(hf_bert_pair, tiny_batch, kind):
    torch, hf, model, variables, sites = hf_bert_pair
    peft = require("peft")
    if kind == "prompt":
        method = prompt_lib.prompt_tuning(L)
        config = peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=L)
    else:
        method = prefix_lib.prefix_tuning(L)
        config = peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=L)
    delta = jax.tree.map(lambda x: 0.5 * x, method.init(jax.random.key(0), variables, sites))
    weight = (np.asarray(delta["prompt"]) if kind == "prompt"
              else _hf_prefix_weight(delta, prefix_lib.attentions(sites)))
    ours = np.asarray(jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch))
    peft_model = _peft(torch, peft, hf, config, weight)
    batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in tiny_batch.items()}
    with torch.no_grad():
        ref = peft_model(**batch).logits.numpy()
        base = hf(**batch).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)
    assert np.abs(ref - base).max() > 1e-3


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_llama_decoder_matches_peft(monkeypatch, kind):
    torch, transformers = torch_transformers(monkeypatch)
    peft = require("peft")
    hf = hf_llama(torch, transformers)
    config = LlamaConfig.from_dict(hf.config.to_dict())
    model = load_hf_llama({k: v.numpy() for k, v in hf.state_dict().items()}, config)
    apply, params = jpeft.nnx.split(model)
    ids = np.random.default_rng(0).integers(1, 128, (2, 5)).astype(np.int32)
    sites = jpeft.probe(apply, params, ids)
    if kind == "prompt":
        method = prompt_lib.prompt_tuning(L)
        pconfig = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L)
    else:
        method = prefix_lib.prefix_tuning(L)
        pconfig = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L)
    delta = jax.tree.map(lambda x: 0.5 * x, method.init(jax.random.key(1), params, sites))
    weight = (np.asarray(delta["prompt"]) if kind == "prompt"
              else _hf_prefix_weight(delta, prefix_lib.attentions(sites)))
    ours = np.asarray(jpeft.wrap(apply, method, sites)(params, delta, ids))
    peft_model = _peft(torch, peft, hf, pconfig, weight)
    with torch.no_grad():
        ref = peft_model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
