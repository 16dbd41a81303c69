"""IA3 to and from Hugging Face PEFT files, checked against PEFT itself in PyTorch (BERT classifier
with its head as modules_to_save; LLaMA decoder), and files that do not fit."""

import copy
import json

import jax
import numpy as np
import pytest

import jpeft
from conftest import hf_llama, perturb, require, torch_logits
from jpeft.interop import hf_peft
from jpeft.interop.hf_files import AdapterFileError
from jpeft.models.llama import LlamaConfig, load_hf_llama

pytestmark = pytest.mark.torch

TOL = dict(atol=1e-4, rtol=1e-4)


def _perturb_peft(torch, peft_model, seed):
    """Move PEFT's ``ia3_l`` (ones at init) and any modules_to_save copy away from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name or "modules_to_save" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def llama():
    """``(torch, peft, hf, apply, params, sites, ids)``: the tiny HF LLaMA and jpeft's copy."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        torch, transformers, peft = (require(m) for m in ("torch", "transformers", "peft"))
        hf = hf_llama(torch, transformers)
        model = load_hf_llama({k: v.numpy() for k, v in hf.state_dict().items()},
                              LlamaConfig.from_dict(hf.config.to_dict()))
        apply, params = jpeft.nnx.split(model)
        ids = np.random.default_rng(0).integers(1, 128, (2, 5)).astype(np.int32)
        yield torch, peft, hf, apply, params, jpeft.probe(apply, params, ids), ids


def test_bert_with_head_loads_in_peft(hf_bert_pair, tiny_batch, tmp_path):
    torch, hf, model, variables, sites = hf_bert_pair
    peft = require("peft")
    method = jpeft.compose(ia3=jpeft.ia3(), head=jpeft.full_finetune(("classifier",)))
    delta = perturb(method.init(jax.random.key(0), variables, sites), scale=0.2)
    ours = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)

    out = hf_peft.save(tmp_path / "ours", variables, method, delta, sites=sites,
                       task_type="SEQ_CLS")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["modules_to_save"] == ["classifier"]
    # PEFT's defaults for BERT: key, value, and both output.dense (feed-forward) of each layer.
    assert len(config["target_modules"]) == 2 * 4 and len(config["feedforward_modules"]) == 2 * 2
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
    np.testing.assert_allclose(torch_logits(torch, loaded, tiny_batch), ours, **TOL)
    assert not np.allclose(ours, model.apply(variables, **tiny_batch), atol=1e-3)


def test_bert_from_peft_with_head(hf_bert_pair, tiny_batch, tmp_path):
    torch, hf, model, variables, sites = hf_bert_pair
    peft = require("peft")
    peft_model = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(task_type="SEQ_CLS"))
    _perturb_peft(torch, peft_model.eval(), seed=1)
    peft_model.save_pretrained(str(tmp_path / "hf"))
    want = torch_logits(torch, peft_model, tiny_batch)

    method, delta = hf_peft.load(tmp_path / "hf", variables, sites=sites)
    assert set(method.config["compose"]) == {"ia3", "head"}
    got = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)
    np.testing.assert_allclose(got, want, **TOL)
    merged = model.apply(method.merge(variables, delta, sites), **tiny_batch)
    np.testing.assert_allclose(merged, want, **TOL)
    assert not np.allclose(want, model.apply(variables, **tiny_batch), atol=1e-3)


def test_llama_both_directions(llama, tmp_path):
    torch, peft, hf, apply, params, sites, ids = llama
    method = jpeft.ia3()
    delta = perturb(method.init(jax.random.key(0), params, sites), scale=0.3)
    ours = apply(method.merge(params, delta, sites), ids)
    np.testing.assert_allclose(jpeft.wrap(apply, method, sites)(params, delta, ids), ours, **TOL)
    out = hf_peft.save(tmp_path / "ours", params, method, delta, sites=sites,
                       task_type="CAUSAL_LM")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
    np.testing.assert_allclose(torch_logits(torch, loaded, {"input_ids": ids}), ours, **TOL)

    peft_model = peft.get_peft_model(copy.deepcopy(hf), peft.IA3Config(task_type="CAUSAL_LM"))
    _perturb_peft(torch, peft_model.eval(), seed=2)
    peft_model.save_pretrained(str(tmp_path / "hf"))
    want = torch_logits(torch, peft_model, {"input_ids": ids})
    m2, d2 = hf_peft.load(tmp_path / "hf", params, sites=sites)
    assert m2.config["method"] == "ia3" and len(m2.config["feedforward"]) == 2     # down_proj
    np.testing.assert_allclose(jpeft.wrap(apply, m2, sites)(params, d2, ids), want, **TOL)
    assert not np.allclose(want, apply(params, ids), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Files that do not fit


KEY0 = "base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l"
FF0 = "base_model.model.bert.encoder.layer.0.output.dense.ia3_l"


@pytest.fixture
def saved(hf_bert_pair, tmp_path):
    _, _, model, variables, sites = hf_bert_pair
    method = jpeft.ia3()
    delta = perturb(method.init(jax.random.key(0), variables, sites))
    hf_peft.save(tmp_path / "a", variables, method, delta, sites=sites)
    return tmp_path / "a", variables, sites, method, delta


def _edit(path, config=None, drop=(), add=None):
    from safetensors.numpy import load_file, save_file
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if config is not None:
        cfg_path.write_text(json.dumps(config(json.loads(cfg_path.read_text()))))
    tensors = {k: v for k, v in load_file(str(w_path)).items() if k not in drop}
    save_file({**tensors, **(add or {})}, str(w_path))


def test_round_trip(saved):
    path, variables, sites, method, delta = saved
    m2, d2 = hf_peft.load(path, variables, sites=sites)
    jax.tree.map(np.testing.assert_array_equal, d2, delta)
    assert m2.config["method"] == "ia3"


@pytest.mark.parametrize("fault,message", [
    (dict(drop=(KEY0,)), rf"missing tensor '{KEY0}' \(IA3 vector of bert\.encoder\.layer\.0\."),
    (dict(add={KEY0: np.ones((1, 32), np.float32)}),
     rf"{KEY0} has shape \(1, 32\), expected \(32, 1\)"),
    (dict(add={FF0: np.ones((64, 1), np.float32)}),
     rf"{FF0} has shape \(64, 1\), expected \(1, 64\) \(feed-forward"),
    (dict(add={"base_model.model.bert.encoder.layer.0.lora_A.weight": np.ones((2, 2), np.float32)}),
     r"tensors this reader does not know .*layer\.0\.lora_A\.weight"),
    (dict(add={"base_model.model.bert.encoder.layer.7.attention.self.key.ia3_l":
               np.ones((32, 1), np.float32)}),
     r"layer\.7\.attention\.self\.key\.ia3_l is for module .* which the base model lacks"),
    (dict(add={"base_model.model.bert.encoder.layer.0.attention.self.query.ia3_l":
               np.ones((32, 1), np.float32)}),
     r"query\.ia3_l is for module .* which the file's target_modules"),
    (dict(config=lambda c: {k: v for k, v in c.items() if k != "target_modules"}),
     "required key 'target_modules' is missing"),
    (dict(config=lambda c: {k: v for k, v in c.items() if k != "feedforward_modules"}),
     "required key 'feedforward_modules' is missing"),
    (dict(config=lambda c: {**c, "target_modules": ["qkv"]}),
     r"target_modules \['qkv'\] select none of the base model's 2-D weights"),
])
def test_a_file_that_does_not_fit_is_one_clear_error(saved, fault, message):
    path, variables, sites, method, delta = saved
    _edit(path, **fault)
    with pytest.raises(AdapterFileError, match=message):
        hf_peft.load(path, variables, sites=sites)


def test_stacked_vectors_have_no_peft_form(saved, tmp_path):
    path, variables, sites, method, delta = saved
    stacked = jax.tree.map(lambda x: x[None], delta)
    with pytest.raises(ValueError, match=r"PEFT files hold IA3 of 2-D weights"):
        hf_peft.save(tmp_path / "b", variables, method, stacked, sites=sites)
