"""LoRA and AdaLoRA to and from Hugging Face PEFT files, checked against PEFT itself in PyTorch
(both directions, logits to 1e-4), and the files that do not fit."""

import copy
import dataclasses
import json
import re
import warnings

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import hf_llama, torch_logits, torch_transformers

import jpeft
from jpeft.interop import hf_peft
from jpeft.interop.hf_files import AdapterFileError
from jpeft.models.bert import BertForSequenceClassification
from jpeft.models.loading import model_record

pytestmark = pytest.mark.torch


def _perturbed(method, variables, sites, seed=1, scale=0.3):
    delta = method.init(jax.random.key(seed), variables, sites)
    leaves, treedef = jax.tree.flatten(delta)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


def test_export_loads_in_hugging_face_peft(hf_bert_pair, tiny_batch, tmp_path):
    """rsLoRA on three targets + the head, and per-module ranks and alphas (two LoRA parts:
    rank_pattern / alpha_pattern)."""
    torch, hf, model, variables, sites = hf_bert_pair
    import peft
    head = jpeft.full_finetune(("classifier",))
    for name, method in {
            "rslora": jpeft.compose(lora=jpeft.lora(("query", "value", "intermediate/dense"),
                                                    rank=4, alpha=8, use_rslora=True),
                                    head=head),
            "patterns": jpeft.compose(q=jpeft.lora(("query",), rank=2, alpha=4.0),
                                      v=jpeft.lora(("value",), rank=4, alpha=16.0))}.items():
        delta = _perturbed(method, variables, sites)
        ours = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)
        out = hf_peft.save(tmp_path / name, variables, method, delta, sites=sites,
                           model=model_record(model))          # pooling="cls": torch's pooling
        config = json.loads((out / "adapter_config.json").read_text())
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
        np.testing.assert_allclose(torch_logits(torch, loaded, tiny_batch), ours, atol=1e-4,
                                   rtol=1e-4)
        assert not np.allclose(ours, model.apply(variables, **tiny_batch), atol=1e-3)
    assert config["r"] == 2 and set(config["rank_pattern"].values()) == {4}
    assert set(config["alpha_pattern"].values()) == {16.0}


def test_a_mean_pooled_classifier_is_not_exported(hf_bert_pair, tiny_batch, tmp_path):
    """Torch's BertForSequenceClassification always pools h[:, 0] through its pooler: the adapter
    of a classifier trained with mean pooling would give other predictions there."""
    torch, hf, model, variables, sites = hf_bert_pair
    import peft
    mean = BertForSequenceClassification(dataclasses.replace(model.config, pooling="mean"))
    bert = {k: v for k, v in variables["params"]["bert"].items() if k != "pooler"}
    mean_variables = {"params": {**variables["params"], "bert": bert}}
    method = jpeft.compose(lora=jpeft.lora(("query", "value"), rank=4, alpha=8),
                           head=jpeft.full_finetune(("classifier",)))
    delta = _perturbed(method, mean_variables, sites)
    refused = (r"this BERT classifier was trained with pooling='mean'.*; torch's "
               r"BertForSequenceClassification, which PEFT loads the adapter onto, always pools "
               r"tanh\(W h\[:, 0\] \+ b\) through its pooler.*pass allow_function_change=True "
               r"only to write it anyway")
    with pytest.raises(ValueError, match=refused):
        hf_peft.save(tmp_path / "a", mean_variables, method, delta, sites=sites,
                     model=model_record(mean))
    with pytest.raises(ValueError, match=refused):          # known from the params too
        hf_peft.save(tmp_path / "a", mean_variables, method, delta, sites=sites)
    assert not (tmp_path / "a").exists()
    # The opt-out writes it; torch's predictions then differ from jpeft's, as documented.
    out = hf_peft.save(tmp_path / "a", mean_variables, method, delta, sites=sites,
                       model=model_record(mean), allow_function_change=True)
    ours = jpeft.wrap(mean.apply, method, sites)(mean_variables, delta, **tiny_batch)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
    assert np.abs(torch_logits(torch, loaded, tiny_batch) - ours).max() > 1e-2


def test_import_from_hugging_face_peft(hf_bert_pair, tiny_batch, tmp_path):
    """A PEFT LoRA with modules_to_save, rank and alpha patterns and layers_to_transform."""
    torch, hf, model, variables, sites = hf_bert_pair
    import peft
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["query", "value", "dense"],
        modules_to_save=["classifier"], rank_pattern={"value": 2}, alpha_pattern={"query": 3.0},
        layers_to_transform=[1], layers_pattern="layer",
        init_lora_weights=False)).eval()        # random B, so the adapter changes the outputs
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)
    peft_model.save_pretrained(str(tmp_path / "hf"))
    want = torch_logits(torch, peft_model, tiny_batch)

    method, delta = hf_peft.load(tmp_path / "hf", variables, sites=sites)
    got = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    merged = model.apply(method.merge(variables, delta, sites), **tiny_batch)
    np.testing.assert_allclose(merged, want, atol=1e-4, rtol=1e-4)
    parts = method.config["compose"]["lora"]["compose"]
    assert {(c["rank"], c["alpha"]) for c in parts.values()} == {(4, 16.0), (2, 16.0), (4, 3.0)}
    assert sum(len(c["targets"]) for c in parts.values()) == 5      # layer 1 only


def test_adalora_both_directions(hf_bert_pair, tiny_batch, tmp_path):
    torch, hf, model, variables, sites = hf_bert_pair
    import peft
    method = jpeft.adalora(("query", "value"), init_r=4, alpha=8.0, target_r=2, total_steps=20)
    delta = _perturbed(method, variables, sites)
    flat = jax.tree.map(np.array, delta)                 # two triplets dropped, as after pruning
    lam = flat["params"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    lam["lora_E"][[1, 3]] = 0.0
    ours = jpeft.wrap(model.apply, method, sites)(variables, flat, **tiny_batch)
    out = hf_peft.save(tmp_path / "ours", variables, method, flat, sites=sites)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
    np.testing.assert_allclose(torch_logits(torch, peft_model, tiny_batch), ours, atol=1e-4,
                               rtol=1e-4)

    torch.manual_seed(2)
    peft_model = peft.get_peft_model(hf, peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=["query", "value"], total_step=20,
        tinit=2, tfinal=4)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_E" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(str(tmp_path / "hf"))
    want = torch_logits(torch, peft_model, tiny_batch)
    m2, d2 = hf_peft.load(tmp_path / "hf", variables, sites=sites)
    assert m2.config["method"] == "adalora" and m2.config["init_r"] == 4
    np.testing.assert_allclose(jpeft.wrap(model.apply, m2, sites)(variables, d2, **tiny_batch),
                               want, atol=1e-4, rtol=1e-4)


def test_adalora_after_peft_budget_schedule_both_directions(hf_bert_pair, tiny_batch, tmp_path):
    """A file PEFT wrote after its budget schedule pruned triplets: ``rank_pattern`` keys
    ``<module>.lora_E``, tensors holding the kept triplets only (none for a module)."""
    torch, hf, model, variables, sites = hf_bert_pair
    import peft
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(hf, peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=["query", "value", "dense"],
        total_step=8, tinit=2, tfinal=2, deltaT=1, beta1=0.5, beta2=0.5))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_E" in name:
                p.normal_(0.0, 0.5)
    opt = torch.optim.SGD(peft_model.parameters(), lr=0.05)
    batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in tiny_batch.items()}
    for step in range(8):
        peft_model(**batch, labels=torch.tensor([0, 1, 0])).loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    peft_model.eval()
    with warnings.catch_warnings():                # PEFT warns of the zero-sized tensors
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "hf"))
    pattern = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["rank_pattern"]
    assert "bert.encoder.layer.0.attention.self.query.lora_E" in pattern
    kept = sorted(sum(keep) for keep in pattern.values())
    assert kept[0] < 4 and any(0 < k < 4 for k in kept), kept         # pruned, some partly
    want = torch_logits(torch, peft_model, tiny_batch)

    method, delta = hf_peft.load(tmp_path / "hf", variables, sites=sites)
    got = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    base = model.apply(variables, **tiny_batch)          # tiny logits: HF's 0.02-scale head
    assert np.abs(got - base).max() > 10 * np.abs(got - want).max()

    out = hf_peft.save(tmp_path / "ours", variables, method, delta, sites=sites)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_bert_pair[1]), str(out)).eval()
    np.testing.assert_allclose(torch_logits(torch, reloaded, tiny_batch), want, atol=1e-4,
                               rtol=1e-4)


@pytest.fixture
def saved(hf_bert_pair, tiny_batch, tmp_path):
    _, _, model, variables, sites = hf_bert_pair
    method = jpeft.lora(("query",), rank=2)
    delta = _perturbed(method, variables, sites)
    hf_peft.save(tmp_path / "a", variables, method, delta, sites=sites)
    return tmp_path / "a", model, variables, sites, method, delta


def test_round_trip(saved, tiny_batch):
    path, model, variables, sites, method, delta = saved
    with pytest.raises(FileExistsError, match="exists"):
        hf_peft.save(path, variables, method, delta, sites=sites)
    m2, d2 = hf_peft.load(path, variables, sites=sites)
    jax.tree.map(np.testing.assert_array_equal, d2, delta)
    run = lambda m, d: jpeft.wrap(model.apply, m, sites)(variables, d, **tiny_batch)
    np.testing.assert_array_equal(run(m2, d2), run(method, delta))


def _edit(path, config=None, drop=(), add=None, reshape=None):
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if config is not None:
        cfg_path.write_text(json.dumps(config(json.loads(cfg_path.read_text()))))
    tensors = load_file(str(w_path))
    for k in [k for k in tensors if any(d in k for d in drop)]:
        del tensors[k]
    tensors.update(add or {})
    for k, shape in (reshape or {}).items():
        key = next(t for t in tensors if k in t)
        tensors[key] = np.zeros(shape, np.float32)
    save_file(tensors, str(w_path))


QUERY0 = "base_model.model.bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("fault,message", [
    (dict(drop=(QUERY0 + ".lora_B",)),
     rf"missing tensor '{QUERY0}\.lora_B\.weight' \(lora_B of bert\.encoder\.layer\.0\."),
    (dict(drop=(QUERY0 + ".lora_A",)), rf"missing tensor '{QUERY0}\.lora_A\.weight'"),
    (dict(add={"base_model.model.bert.pooler.dense.lora_X.weight": np.zeros((2, 2), np.float32)}),
     r"tensors this reader does not know .*'base_model\.model\.bert\.pooler\.dense\.lora_X"),
    (dict(reshape={QUERY0 + ".lora_A": (2, 31)}),
     rf"{QUERY0}\.lora_A\.weight has shape \(2, 31\), expected \(2, 32\)"),
    (dict(config=lambda c: {**c, "r": 3}), r"has shape \(2, 32\), expected \(3, 32\)"),
    (dict(config=lambda c: {k: v for k, v in c.items() if k != "target_modules"}),
     "required key 'target_modules' is missing"),
    (dict(config=lambda c: {k: v for k, v in c.items() if k != "peft_type"}),
     "required key 'peft_type' is missing"),
    (dict(config=lambda c: {**c, "peft_type": "LOHA"}), "peft_type 'LOHA' has no jpeft reader"),
    (dict(config=lambda c: {**c, "use_dora": True}), "use_dora=True has no jpeft form"),
    (dict(config=lambda c: {**c, "target_modules": ["qkv"]}),
     r"target_modules \['qkv'\] select none of the base model's 2-D weights"),
])
def test_a_file_that_does_not_fit_is_one_clear_error(saved, fault, message):
    path, model, variables, sites, method, delta = saved
    _edit(path, **fault)
    with pytest.raises(AdapterFileError, match=message):
        hf_peft.load(path, variables, sites=sites)


@pytest.mark.parametrize("key,value,expected", [
    ("r", "abc", "an int"),
    ("r", True, "an int"),
    ("r", 2.5, "an int"),
    ("lora_alpha", "16", "a number"),
    ("use_rslora", "false", "a bool (true or false)"),
    ("use_dora", 0, "a bool (true or false)"),
    ("rank_pattern", [1, 2], "an object {regular expression: int} or null"),
    ("rank_pattern", {"query": "2"}, "an object {regular expression: int} or null"),
    ("alpha_pattern", {"query": True}, "an object {regular expression: number} or null"),
    ("target_modules", 123, "a regular expression (str, RE2 syntax) or a list of str"),
    ("target_modules", ["query", 1], "a regular expression (str, RE2 syntax) or a list of str"),
    ("target_modules", r"(query)\1", "a regular expression (str, RE2 syntax) or a list of str "
                                     "(the pattern '(query)\\\\1' is not RE2 syntax"),
    ("layers_to_transform", "0", "an int or a list of int or null"),
    ("peft_type", 1, "a str"),
    ("modules_to_save", "classifier", "a list of str or null"),
])
def test_a_config_value_of_the_wrong_type_is_one_clear_error(saved, key, value, expected):
    """Naming the file, the key, the value and the type expected; never read as something else
    (``"use_rslora": "false"`` is not true)."""
    path, model, variables, sites, method, delta = saved
    _edit(path, config=lambda c: {**c, key: value})
    shown = {dict: "object", list: "list"}.get(type(value), type(value).__name__)
    message = (f"{path / 'adapter_config.json'}: key {key!r} is {value!r} ({shown}); expected "
               f"{expected}")
    with pytest.raises(AdapterFileError, match="^" + re.escape(message)):
        hf_peft.load(path, variables, sites=sites)


def test_a_config_that_is_not_an_object_is_one_clear_error(saved):
    path, model, variables, sites, method, delta = saved
    _edit(path, config=lambda c: [c["r"]])
    with pytest.raises(AdapterFileError, match=re.escape(
            f"{path / 'adapter_config.json'}: the config is [2] (list); expected a JSON object")):
        hf_peft.load(path, variables, sites=sites)


def test_a_pathological_target_pattern_from_a_file_does_not_hang(saved):
    from deadline import within
    path, model, variables, sites, method, delta = saved
    _edit(path, config=lambda c: {**c, "target_modules": "(.*.*)*Z"})
    with pytest.raises(AdapterFileError, match=r"target_modules '\(\.\*\.\*\)\*Z' select none"):
        within(5.0, hf_peft.load, path, variables, sites=sites)


def test_another_base_is_one_clear_error(saved):
    path, model, variables, sites, method, delta = saved
    other = {"params": {"encoder": variables["params"]["bert"]["encoder"]}}   # other names
    with pytest.raises(AdapterFileError, match=r"target_modules \['bert\.encoder\.layer\.0\."):
        hf_peft.load(path, other)


def test_damaged_files_and_methods_without_a_peft_form(saved, tmp_path):
    path, model, variables, sites, method, delta = saved
    w = path / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="cannot be read: damaged or truncated"):
        hf_peft.load(path, variables, sites=sites)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="is not valid JSON"):
        hf_peft.load(path, variables, sites=sites)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in"):
        hf_peft.load(tmp_path / "nothing", variables)
    with pytest.raises(ValueError, match="part 'bitfit' is 'bitfit', which has no Hugging Face"):
        hf_peft.save(tmp_path / "b", variables, jpeft.bitfit(), {})
    ada = jpeft.adalora(("query",), init_r=2)
    with pytest.raises(ValueError, match="PEFT's AdaLoRA config requires total_step"):
        hf_peft.save(tmp_path / "c", variables, ada, ada.init(jax.random.key(0), variables, sites),
                     sites=sites)


def test_conv1d_style_kernel_with_fan_in_fan_out(monkeypatch, tmp_path):
    """GPT-2's layout: the Flax kernel is ``[out, in]`` (contracted on its second axis) and the
    torch ``Conv1D`` weight ``[in, out]``; PEFT reads the file with ``fan_in_fan_out: true`` and
    computes what jpeft does, both directions."""
    import flax.linen as nn
    from jax import lax

    torch, transformers = torch_transformers(monkeypatch)
    import peft
    from transformers.pytorch_utils import Conv1D

    d_in, d_out = 12, 18

    class Attn(nn.Module):               # c_attn as transformers' FlaxGPT2 stores it
        @nn.compact
        def __call__(self, x):
            kernel = self.param("kernel", nn.initializers.normal(0.2), (d_out, d_in))
            bias = self.param("bias", nn.initializers.normal(0.2), (d_out,))
            return lax.dot_general(x, kernel, (((x.ndim - 1,), (1,)), ((), ()))) + bias

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Attn(name="c_attn")(x)

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(d_out, d_in)

        def forward(self, x):
            return self.c_attn(x)

    x = np.random.default_rng(0).normal(size=(2, 5, d_in)).astype(np.float32)
    model = Net()
    variables = model.init(jax.random.key(0), x)
    sites = jpeft.probe(model.apply, variables, x)

    def torch_net():
        net = TorchNet()
        with torch.no_grad():
            net.c_attn.weight.copy_(torch.from_numpy(np.asarray(
                variables["params"]["c_attn"]["kernel"]).T.copy()))
            net.c_attn.bias.copy_(torch.from_numpy(np.asarray(
                variables["params"]["c_attn"]["bias"]).copy()))
        return net
    run_torch = lambda net: net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(run_torch(torch_net()), model.apply(variables, x), atol=1e-5)

    method = jpeft.lora(("c_attn",), rank=3, alpha=6.0)
    delta = _perturbed(method, variables, sites)
    ours = jpeft.wrap(model.apply, method, sites)(variables, delta, x)
    out = hf_peft.save(tmp_path / "ours", variables, method, delta, sites=sites,
                       fan_in_fan_out=True)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(torch_net(), str(out)).eval()
    np.testing.assert_allclose(run_torch(loaded), ours, atol=1e-4, rtol=1e-4)

    torch.manual_seed(3)
    theirs = peft.get_peft_model(torch_net(), peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["c_attn"], fan_in_fan_out=True,
        init_lora_weights=False))
    theirs.save_pretrained(str(tmp_path / "hf"))
    m2, d2 = hf_peft.load(tmp_path / "hf", variables, sites=sites)
    np.testing.assert_allclose(jpeft.wrap(model.apply, m2, sites)(variables, d2, x),
                               run_torch(theirs), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(model.apply(m2.merge(variables, d2, sites), x),
                               run_torch(theirs), atol=1e-4, rtol=1e-4)


def test_llama_decoder_lora_and_adalora_both_directions(monkeypatch, tmp_path):
    """LoRA (all linear weights) and AdaLoRA on the GQA LLaMA decoder, both directions."""
    from jpeft.models.llama import LlamaConfig, load_hf_llama
    torch, transformers = torch_transformers(monkeypatch)
    import peft
    hf = hf_llama(torch, transformers)
    model = load_hf_llama({k: v.numpy() for k, v in hf.state_dict().items()},
                          LlamaConfig.from_dict(hf.config.to_dict()))
    apply, params = jpeft.nnx.split(model)
    ids = np.random.default_rng(0).integers(1, 128, (2, 5)).astype(np.int32)
    sites = jpeft.probe(apply, params, ids)
    logits = lambda m: m(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.detach().numpy()
    for kind, method, config in (
            ("lora", jpeft.lora(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"), rank=4, alpha=8.0),
             peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                             init_lora_weights=False)),
            ("adalora", jpeft.adalora(("q_proj", "v_proj"), init_r=4, alpha=8.0, target_r=2,
                                      total_steps=10),
             peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10,
                                target_modules=["q_proj", "v_proj"]))):
        delta = _perturbed(method, params, sites)
        ours = jpeft.wrap(apply, method, sites)(params, delta, ids)
        out = hf_peft.save(tmp_path / f"ours_{kind}", params, method, delta, sites=sites,
                           task_type="CAUSAL_LM")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
        np.testing.assert_allclose(logits(loaded), ours, atol=1e-4, rtol=1e-4, err_msg=kind)

        torch.manual_seed(4)
        theirs = peft.get_peft_model(copy.deepcopy(hf), config).eval()
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "lora_E" in name or "lora_B" in name:
                    p.normal_(0.0, 0.3)
        theirs.save_pretrained(str(tmp_path / f"hf_{kind}"))
        m2, d2 = hf_peft.load(tmp_path / f"hf_{kind}", params, sites=sites)
        got = jpeft.wrap(apply, m2, sites)(params, d2, ids)
        np.testing.assert_allclose(got, logits(theirs), atol=1e-4, rtol=1e-4, err_msg=kind)
        assert not np.allclose(got, apply(params, ids), atol=1e-3)
