"""Many adapters on one base: the named set, weighted LoRA combinations against Hugging Face
PEFT's add_weighted_adapter, and mixed batches against each example run alone."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import perturb, require

import jpeft
from jpeft import multi
from jpeft.interop import hf_peft


@pytest.fixture
def bert(tiny_bert, tiny_sites):
    model, params = tiny_bert
    return model, {"params": params}, tiny_sites


def _lora(bert, targets, rank, alpha, seed):
    model, variables, sites = bert
    method = jpeft.lora(targets, rank=rank, alpha=alpha)
    return method, perturb(method.init(jax.random.key(seed), variables, sites), seed=seed,
                           scale=0.3)


def test_named_set_add_select_disable_delete(bert, tiny_batch):
    model, variables, sites = bert
    (m1, d1), (m2, d2) = _lora(bert, ("query", "value"), 2, 4.0, 1), _lora(bert, ("query",), 3,
                                                                           3.0, 2)
    s = multi.AdapterSet().add("one", m1, d1).add("two", m2, d2)
    run = lambda st: jpeft.wrap(model.apply, *st.method_and_delta()[:1], sites)(
        variables, st.method_and_delta()[1], **tiny_batch)
    base = model.apply(variables, **tiny_batch)
    np.testing.assert_array_equal(run(s), base)                       # nothing active yet
    one = run(s.select("one"))
    np.testing.assert_allclose(one, jpeft.wrap(model.apply, m1, sites)(variables, d1, **tiny_batch),
                               rtol=1e-6, atol=1e-6)
    # both active on the shared query weight: the changes add up (merged by hand)
    both = run(s.select("one", "two"))
    merged = m2.merge(m1.merge(variables, d1, sites), d2, sites)
    np.testing.assert_allclose(both, model.apply(merged, **tiny_batch), rtol=1e-5, atol=1e-5)
    method, delta = s.select("one", "two").method_and_delta()
    np.testing.assert_allclose(model.apply(method.merge(variables, delta, sites), **tiny_batch),
                               both, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(run(s.select("one", "two").disable()), base)
    s2 = s.select("one", "two").delete("one")
    assert s2.active == ("two",) and sorted(s2.methods) == ["two"]
    with pytest.raises(ValueError, match=r"no adapter named \['three'\]; the set has"):
        s.select("three")
    with pytest.raises(ValueError, match="an adapter named 'one' exists"):
        s.add("one", m1, d1)
    with pytest.raises(ValueError, match="two parts edit the contractions of .* jpeft.active"):
        jpeft.wrap(model.apply, jpeft.compose(a=m1, b=m2), sites)(
            variables, {"a": d1, "b": d2}, **tiny_batch)


def _content_mask(x, density):
    """A deterministic elementwise mask (so that both implementations draw the same DARE masks)."""
    return np.modf(np.abs(np.asarray(x, np.float64)) * 1e4)[0] < density


@pytest.mark.torch
def test_switch_compiles_once_per_method_and_equals_wrap(bert, tiny_batch):
    model, variables, sites = bert
    method = jpeft.lora(("query", "value"), rank=2, alpha=4.0)
    deltas = [perturb(method.init(jax.random.key(k), variables, sites), seed=k, scale=0.3)
              for k in range(3)]
    other, d_other = _lora(bert, ("query",), 3, 3.0, 7)
    s = multi.AdapterSet()
    for k, d in enumerate(deltas):
        s = s.add(f"task{k}", method, d)
    s = s.add("other", other, d_other)
    forward = multi.switch(model.apply, sites)
    expect = lambda m, d: jpeft.wrap(model.apply, m, sites)(variables, d, **tiny_batch)
    outs = []
    for k in (0, 1, 2, 0):                     # one method object: one executable for all three
        outs.append(forward(s.select(f"task{k}"), variables, **tiny_batch))
        np.testing.assert_allclose(outs[-1], expect(method, deltas[k]), rtol=1e-6, atol=1e-6)
    assert forward.compiled() == 1
    assert not np.allclose(outs[0], outs[1])   # the deltas differ: each call used its own
    np.testing.assert_allclose(forward(s.select("other"), variables, **tiny_batch),
                               expect(other, d_other), rtol=1e-6, atol=1e-6)
    both = forward(s.select("task1", "other"), variables, **tiny_batch)
    np.testing.assert_allclose(both, expect(*s.select("task1", "other").method_and_delta()),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(forward(s.disable(), variables, **tiny_batch),
                               model.apply(variables, **tiny_batch), rtol=1e-6, atol=1e-6)
    assert forward.compiled() == 4
    forward(s.select("task2"), variables, **tiny_batch)
    forward(s.select("task1", "other"), variables, **tiny_batch)
    assert forward.compiled() == 4             # switching back compiles nothing
    with pytest.raises(TypeError, match="the first argument is the AdapterSet"):
        forward(variables, variables, **tiny_batch)


def test_weighted_combinations_equal_hugging_face(hf_bert_pair, tiny_batch, tmp_path, monkeypatch):
    torch, hf, model, variables, sites = hf_bert_pair
    peft = require("peft")
    from peft.utils import merge_utils

    def random_pruning(tensor, density, rescale):          # PEFT's DARE masks, made shared
        mask = torch.from_numpy(_content_mask(tensor.detach().numpy(), density))
        out = tensor * mask
        return out / density if rescale else out
    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)

    torch.manual_seed(0)
    cfg = lambda targets, r, alpha: peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                    init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg(["query", "value"], 4, 8), adapter_name="a")
    pm.add_adapter("b", cfg(["query", "intermediate.dense"], 4, 16))
    pm.add_adapter("c", cfg(["value"], 2, 2))
    pm.save_pretrained(str(tmp_path / "hf"))
    ours = {n: hf_peft.load(tmp_path / "hf" / n, variables, sites=sites) for n in "abc"}
    batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in tiny_batch.items()}
    cases = [("linear", "ab"), ("cat", "abc"), ("svd", "abc"), ("ties", "ab"),
             ("dare_linear", "ab"), ("dare_ties", "ab"), ("magnitude_prune", "ab"),
             ("ties_svd", "abc"), ("magnitude_prune_svd", "abc")]
    weights = {"a": 0.7, "b": -0.4, "c": 1.3}
    for kind, names in cases:
        w = [weights[n] for n in names]
        pm.add_weighted_adapter(list(names), w, f"{kind}", combination_type=kind, density=0.5,
                                svd_rank=3 if kind.endswith("svd") else None)
        pm.set_adapter(kind)
        pm.eval()
        with torch.no_grad():
            want = pm(**batch).logits.numpy()
        method, delta = multi.weighted_lora(
            [ours[n] for n in names], w, kind, density=0.5,
            svd_rank=3 if kind.endswith("svd") else None,
            mask_fn=lambda x, d: jnp.asarray(_content_mask(x, d)))
        got = jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=kind)
        assert method.config["rank"] == {"cat": 10}.get(kind, 3 if kind.endswith("svd") else 4)
    with pytest.raises(ValueError, match="linear needs adapters of one rank, got"):
        multi.weighted_lora([ours["a"], ours["c"]], [1.0, 1.0], "linear")
    with pytest.raises(ValueError, match="dare_ties draws random masks: pass key="):
        multi.weighted_lora([ours["a"], ours["b"]], [1.0, 1.0], "dare_ties", density=0.5)


def test_mixed_batch_equals_each_example_alone(bert, tiny_batch):
    model, variables, sites = bert
    adapters = {"q": jpeft.lora(("query", "value"), rank=2),
                "ia3": jpeft.ia3(),
                "houlsby": jpeft.houlsby(bottleneck_size=4)}
    deltas = {n: perturb(m.init(jax.random.key(i), variables, sites), seed=i, scale=0.3)
              for i, (n, m) in enumerate(adapters.items())}
    method = multi.mixed(**adapters)
    index = np.array([2, -1, 0], np.int32)
    got = jax.jit(jpeft.wrap(model.apply, method, sites))(variables, deltas, **tiny_batch,
                                                          method_inputs=index)
    names = list(adapters)
    for b, k in enumerate(index):
        one = {key: v[b:b + 1] for key, v in tiny_batch.items()}
        want = (model.apply(variables, **one) if k < 0 else jpeft.wrap(
            model.apply, adapters[names[k]], sites)(variables, deltas[names[k]], **one))
        np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"pass each example's adapter as method_inputs=index"):
        jpeft.wrap(model.apply, method, sites)(variables, deltas, **tiny_batch)
    with pytest.raises(ValueError, match="adapter 'bitfit' changes the parameters"):
        jpeft.wrap(model.apply, multi.mixed(bitfit=jpeft.bitfit()), sites)(
            variables, {"bitfit": jpeft.bitfit().init(jax.random.key(0), variables)},
            **tiny_batch, method_inputs=index)


def test_compositions_with_a_head_split_into_parts_for_the_multi_adapter_tools(bert, tiny_batch):
    """A ``lora + head`` composition is refused by weighted_lora and mixed with the way out named;
    ``jpeft.parts`` gives its LoRA alone (the same forward as the composition minus the head)."""
    model, variables, sites = bert
    method = jpeft.compose(lora=jpeft.lora(("query", "value"), rank=2, alpha=4.0),
                           head=jpeft.full_finetune(("classifier",)))
    delta = perturb(method.init(jax.random.key(0), variables, sites), seed=0, scale=0.3)
    with pytest.raises(ValueError, match=r"composition of lora, head.*jpeft.parts\(method, "
                                         r"delta\)\['lora'\]"):
        multi.weighted_lora([(method, delta), (method, delta)], [0.5, 0.5], "linear")
    with pytest.raises(ValueError, match=r"jpeft.parts"):
        jpeft.wrap(model.apply, multi.mixed(a=method), sites)(
            variables, {"a": delta}, **tiny_batch, method_inputs=jnp.zeros(2, jnp.int32))
    got = jpeft.parts(method, delta)
    assert sorted(got) == ["head", "lora"]
    lora, lora_delta = got["lora"]
    assert lora.config == method.config["compose"]["lora"] and lora_delta is delta["lora"]
    head, head_delta = got["head"]
    # the parts applied one after the other are the composition
    params = head.merge(variables, head_delta, sites)
    np.testing.assert_allclose(
        jpeft.wrap(model.apply, lora, sites)(params, lora_delta, **tiny_batch),
        jpeft.wrap(model.apply, method, sites)(variables, delta, **tiny_batch),
        rtol=1e-6, atol=1e-6)
    combined, _ = multi.weighted_lora([got["lora"], got["lora"]], [0.5, 0.5], "linear")
    assert combined.config["method"] == "lora"
    assert sorted(jpeft.parts(method)) == ["head", "lora"]
    with pytest.raises(ValueError, match="not a composition"):
        jpeft.parts(lora)
    with pytest.raises(ValueError, match="are not the method's"):
        jpeft.parts(method, {"lora": lora_delta})
