"""LoRA adapters to and from Hugging Face PEFT files, checked against PEFT itself in PyTorch."""

import json

import jax
import numpy as np
import pytest

import jpeft
from jpeft.interop import hf_peft

pytestmark = pytest.mark.torch


def _torch_logits(torch, model, batch):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}).logits.numpy()


def test_export_loads_in_hugging_face_peft(hf_bert_pair, tiny_batch, tmp_path):
    torch, hf, model, variables, sites = hf_bert_pair
    import peft
    method = jpeft.compose(lora=jpeft.lora(("query", "value", "intermediate/dense"), rank=4,
                                           alpha=8, use_rslora=True),
                           head=jpeft.full_finetune(("classifier",)))
    delta = method.init(jax.random.key(1), variables, sites)
    delta = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), delta)
    ours = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)

    out = hf_peft.save_lora(tmp_path / "adapter", variables, method, delta)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["use_rslora"] and config["modules_to_save"] == ["classifier"]
    loaded = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    np.testing.assert_allclose(_torch_logits(torch, loaded, tiny_batch), ours, atol=1e-4, rtol=1e-4)
    assert not np.allclose(ours, model.apply(variables, **tiny_batch), atol=1e-3)


def test_import_from_hugging_face_peft(hf_bert_pair, tiny_batch, tmp_path):
    torch, hf, model, variables, sites = hf_bert_pair
    import peft
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["query", "value", "dense"], modules_to_save=["classifier"],
        init_lora_weights=False)).eval()        # random B, so the adapter changes the outputs
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    peft_model.save_pretrained(str(tmp_path / "hf"))
    want = _torch_logits(torch, peft_model, tiny_batch)

    method, delta = hf_peft.load_lora(tmp_path / "hf", variables)
    got = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    merged = model.apply(method.merge(variables, delta, sites), **tiny_batch)
    np.testing.assert_allclose(merged, want, atol=1e-4, rtol=1e-4)
    # query, value and the three "dense" of each of 2 layers, plus the pooler's dense.
    assert len(method.config["compose"]["lora"]["targets"]) == 2 * 5 + 1


def test_round_trip_and_errors(hf_bert_pair, tiny_batch, tmp_path):
    _, _, model, variables, sites = hf_bert_pair
    method = jpeft.lora(("query",), rank=2)
    delta = jax.tree.map(lambda x: x + 0.1, method.init(jax.random.key(0), variables, sites))
    hf_peft.save_lora(tmp_path / "a", variables, method, delta)
    with pytest.raises(FileExistsError, match="exists"):
        hf_peft.save_lora(tmp_path / "a", variables, method, delta)
    m2, d2 = hf_peft.load_lora(tmp_path / "a", variables)
    jax.tree.map(np.testing.assert_array_equal, d2, delta)
    np.testing.assert_array_equal(jpeft.wrap(model.apply, m2, sites)(variables, d2, **tiny_batch),
                                  jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch))

    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key, value, msg in (("peft_type", "IA3", "only 'LORA'"), ("use_dora", True, "use_dora"),
                            ("rank_pattern", {"query": 8}, "rank_pattern")):
        cfg_path.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=msg):
            hf_peft.load_lora(tmp_path / "a", variables)
    cfg_path.write_text(json.dumps({**cfg, "r": 3}))
    with pytest.raises(ValueError, match=r"has shape \(2, 32\), expected \(3, 32\)"):
        hf_peft.load_lora(tmp_path / "a", variables)
    other = {"params": {"encoder": variables["params"]["bert"]["encoder"]}}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not have; closest modules"):
        hf_peft.load_lora(tmp_path / "a", other)
    with pytest.raises(ValueError, match="only LoRA and fully trained"):
        hf_peft.save_lora(tmp_path / "b", variables, jpeft.bitfit(), {})
