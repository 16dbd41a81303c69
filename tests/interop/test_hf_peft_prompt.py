"""Prompt and prefix tuning to and from Hugging Face PEFT files, checked against PEFT itself in
PyTorch (BERT classifier: prompt tuning with its head; LLaMA decoder with grouped-query attention:
prompt and prefix tuning, PEFT's reparametrised prefix included), and files that do not fit."""

import copy
import json

import jax
import numpy as np
import pytest

import jpeft
from conftest import hf_llama, require, torch_logits
from jpeft.interop import hf_peft
from jpeft.interop.hf_files import AdapterFileError
from jpeft.methods import prefix as prefix_lib
from jpeft.methods import prompt as prompt_lib
from jpeft.models.llama import LlamaConfig, load_hf_llama

pytestmark = pytest.mark.torch

L = 3
TOL = dict(atol=1e-4, rtol=1e-4)


def _jpeft_llama(torch, transformers, **overrides):
    hf = hf_llama(torch, transformers, **overrides)
    model = load_hf_llama({k: v.numpy() for k, v in hf.state_dict().items()},
                          LlamaConfig.from_dict(hf.config.to_dict()))
    apply, params = jpeft.nnx.split(model)
    return hf, apply, params


@pytest.fixture(scope="module")
def llama():
    """``(torch, peft, hf, apply, params, sites, ids)``: the tiny HF LLaMA and jpeft's copy."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        torch, transformers, peft = (require(m) for m in ("torch", "transformers", "peft"))
        hf, apply, params = _jpeft_llama(torch, transformers)
        ids = np.random.default_rng(0).integers(1, 128, (2, 5)).astype(np.int32)
        yield torch, peft, hf, apply, params, jpeft.probe(apply, params, ids), ids


def _init(method, params, sites, seed=0):
    return jax.tree.map(lambda x: 0.5 * x, method.init(jax.random.key(seed), params, sites))


# --------------------------------------------------------------------------------------------
# BERT classifier: prompt tuning


def test_bert_prompt_with_head_loads_in_peft(hf_bert_pair, tiny_batch, tmp_path):
    torch, hf, model, variables, sites = hf_bert_pair
    peft = require("peft")
    method = jpeft.compose(prompt=prompt_lib.prompt_tuning(L),
                           head=jpeft.full_finetune(("classifier",)))
    delta = _init(method, variables, sites)
    delta["head"] = jax.tree.map(lambda x: x + 0.3, delta["head"])
    ours = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)

    out = hf_peft.save(tmp_path / "ours", variables, method, delta, sites=sites,
                       task_type="SEQ_CLS")
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "num_virtual_tokens", "token_dim", "num_layers",
                                   "num_attention_heads", "modules_to_save")} == {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": L, "token_dim": 32, "num_layers": 2,
        "num_attention_heads": 4, "modules_to_save": ["classifier"]}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
    np.testing.assert_allclose(torch_logits(torch, loaded, tiny_batch), ours, **TOL)


def test_bert_prompt_from_peft(hf_bert_pair, tiny_batch, tmp_path):
    torch, hf, model, variables, sites = hf_bert_pair
    peft = require("peft")
    torch.manual_seed(3)                       # PEFT's RANDOM prompt: N(0, 1)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), peft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=L)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3)
    peft_model.save_pretrained(str(tmp_path / "hf"))
    want = torch_logits(torch, peft_model, tiny_batch)

    method, delta = hf_peft.load(tmp_path / "hf", variables, sites=sites)
    assert set(method.config["compose"]) == {"prompt", "head"}
    got = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)
    np.testing.assert_allclose(got, want, **TOL)


# --------------------------------------------------------------------------------------------
# LLaMA decoder: prompt and prefix tuning


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_llama_both_directions(llama, tmp_path, kind):
    torch, peft, hf, apply, params, sites, ids = llama
    method = (prompt_lib.prompt_tuning(L) if kind == "prompt" else prefix_lib.prefix_tuning(L))
    delta = _init(method, params, sites)
    ours = jpeft.wrap(apply, method, sites)(params, delta, ids)
    assert np.abs(ours[:, -ids.shape[1]:] - apply(params, ids)).max() > 1e-3
    out = hf_peft.save(tmp_path / "ours", params, method, delta, sites=sites,
                       task_type="CAUSAL_LM")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
    np.testing.assert_allclose(torch_logits(torch, loaded, {"input_ids": ids}), ours, **TOL)

    config_cls = peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig
    torch.manual_seed(4)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), config_cls(
        task_type="CAUSAL_LM", num_virtual_tokens=L)).eval()
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.mul_(0.5)
    peft_model.save_pretrained(str(tmp_path / "hf"))
    want = torch_logits(torch, peft_model, {"input_ids": ids})
    m2, d2 = hf_peft.load(tmp_path / "hf", params, sites=sites)
    assert m2.config["method"] == kind and m2.config["num_virtual_tokens"] == L
    np.testing.assert_allclose(jpeft.wrap(apply, m2, sites)(params, d2, ids), want, **TOL)


def test_llama_peft_reparametrised_prefix_loads_as_its_prefixes(llama, tmp_path):
    torch, peft, hf, apply, params, sites, ids = llama
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=L, prefix_projection=True,
        encoder_hidden_size=16)).eval()
    peft_model.save_pretrained(str(tmp_path / "hf"))
    want = torch_logits(torch, peft_model, {"input_ids": ids})      # through PEFT's MLP
    method, delta = hf_peft.load(tmp_path / "hf", params, sites=sites)
    assert not method.config["reparametrize"]
    np.testing.assert_allclose(jpeft.wrap(apply, method, sites)(params, delta, ids), want, **TOL)


def test_bert_prefix_round_trip(hf_bert_pair, tmp_path):
    # (PEFT cannot run prefix tuning on this transformers' BERT: the format only.)
    _, _, _, variables, sites = hf_bert_pair
    method = prefix_lib.prefix_tuning(L)
    delta = _init(method, variables, sites)
    out = hf_peft.save(tmp_path / "p", variables, method, delta, sites=sites)
    config = json.loads((out / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("num_layers", "num_attention_heads", "token_dim",
                                   "encoder_hidden_size", "prefix_projection")} == {
        "num_layers": 2, "num_attention_heads": 4, "token_dim": 32, "encoder_hidden_size": 32,
        "prefix_projection": False}
    m2, d2 = hf_peft.load(out, variables, sites=sites)
    jax.tree.map(np.testing.assert_array_equal, d2, delta)


def test_reparametrised_prefix_is_saved_folded(llama, tmp_path):
    torch, peft, hf, apply, params, sites, ids = llama
    method = prefix_lib.prefix_tuning(L, reparametrize=True, hidden_size=8)
    delta = method.init(jax.random.key(6), params, sites)
    with pytest.raises(ValueError, match=r"fold it first with jpeft\.methods\.prefix\.fold"):
        hf_peft.save(tmp_path / "r", params, method, delta, sites=sites)
    folded, fdelta = prefix_lib.folded(method), prefix_lib.fold(method, delta, sites)
    out = hf_peft.save(tmp_path / "f", params, folded, fdelta, sites=sites)
    m2, d2 = hf_peft.load(out, params, sites=sites)
    np.testing.assert_allclose(jpeft.wrap(apply, m2, sites)(params, d2, ids),
                               jpeft.wrap(apply, method, sites)(params, delta, ids), **TOL)


# --------------------------------------------------------------------------------------------
# Files that do not fit


@pytest.fixture(scope="module")
def saved_prefix(llama, tmp_path_factory):
    torch, peft, hf, apply, params, sites, ids = llama
    method = prefix_lib.prefix_tuning(L)
    path = tmp_path_factory.mktemp("prefix") / "a"
    hf_peft.save(path, params, method, _init(method, params, sites), sites=sites)
    return path


def _copy_edited(src, dst, config=None, add=None):
    from safetensors.numpy import load_file, save_file
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(config(cfg) if config else cfg))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({**tensors, **(add or {})}, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("fault,message", [
    (dict(config=lambda c: {k: v for k, v in c.items() if k != "num_virtual_tokens"}),
     "required key 'num_virtual_tokens' is missing"),
    (dict(config=lambda c: {k: v for k, v in c.items() if k != "num_layers"}),
     "required key 'num_layers' is missing"),
    (dict(config=lambda c: {**c, "num_virtual_tokens": 4}),
     r"prompt_embeddings has shape \(3, 128\), expected \(4, 128\)"),
    (dict(add={"prompt_embeddings": np.zeros((L, 64), np.float32)}),
     r"prompt_embeddings has shape \(3, 64\), expected \(3, 128\)"),
    (dict(config=lambda c: {**c, "token_dim": 64, "num_attention_heads": 4}),
     r"num_attention_heads is 4 but the base model has 2 \(key/value heads\)"),
    (dict(config=lambda c: {**c, "num_transformer_submodules": 2}),
     "num_transformer_submodules=2"),
    (dict(add={"base_model.prefix_encoder.weight": np.zeros((2,), np.float32)}),
     r"tensors this reader does not know .*'base_model\.prefix_encoder\.weight'"),
])
def test_a_prefix_file_that_does_not_fit_is_one_clear_error(llama, saved_prefix, tmp_path,
                                                            fault, message):
    params, sites = llama[4], llama[5]
    path = _copy_edited(saved_prefix, tmp_path / "bad", **fault)
    with pytest.raises(AdapterFileError, match=message):
        hf_peft.load(path, params, sites=sites)


def test_a_prefix_file_for_another_number_of_layers(llama, saved_prefix, monkeypatch):
    torch, transformers = require("torch"), require("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, apply, params = _jpeft_llama(torch, transformers, num_hidden_layers=1)
    sites = jpeft.probe(apply, params, llama[6])
    with pytest.raises(AdapterFileError, match=r"num_layers is 2 but the base model has 1"):
        hf_peft.load(saved_prefix, params, sites=sites)


def test_a_prompt_file_for_another_width(hf_bert_pair, llama, tmp_path):
    _, _, _, variables, sites = hf_bert_pair
    torch, peft, hf, apply, params, llama_sites, ids = llama
    method = prompt_lib.prompt_tuning(L)
    out = hf_peft.save(tmp_path / "p", params, method, _init(method, params, llama_sites),
                       sites=llama_sites)
    with pytest.raises(AdapterFileError, match=r"token_dim is 64 but the base model has 32"):
        hf_peft.load(out, variables, sites=sites)
    missing = _copy_edited(out, tmp_path / "m", config=lambda c: {**c, "token_dim": None})
    with pytest.raises(AdapterFileError, match="required key 'token_dim' is missing"):
        hf_peft.load(missing, params, sites=llama_sites)
