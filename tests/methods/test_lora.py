"""LoRA against the math: W = W0 + s A B, factored == merged == materialised, counts, errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from conftest import perturb as _perturb, require
from jpeft.core import paths


class Setup:
    def __init__(self, model, variables, method, delta, batch, sites):
        self.model, self.variables, self.method, self.delta, self.batch, self.sites = (
            model, variables, method, delta, batch, sites)

    def __iter__(self):
        return iter((self.model, self.variables, self.method, self.delta, self.batch))


@pytest.fixture
def setup(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.lora(targets=("query", "value"), rank=4, alpha=8)
    delta = method.init(jax.random.key(1), variables, tiny_sites)
    return Setup(model, variables, method, delta, tiny_batch, tiny_sites)


def test_zero_delta_is_exactly_the_base_model(setup):
    model, variables, method, delta, batch = setup
    base = model.apply(variables, **batch)
    for mode in ("factored", "materialised"):
        out = jpeft.wrap(model.apply, method, setup.sites, mode=mode)(variables, delta, **batch)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


def test_merge_equals_factored_and_materialised(setup):
    model, variables, method, delta, batch = setup
    sites = setup.sites
    delta = _perturb(delta)
    fact = jpeft.wrap(model.apply, method, sites)(variables, delta, **batch)
    mat = jpeft.wrap(model.apply, method, sites, mode="materialised")(variables, delta, **batch)
    merged = model.apply(method.merge(variables, delta, sites), **batch)
    assert not np.allclose(fact, model.apply(variables, **batch), atol=1e-3)
    np.testing.assert_allclose(fact, merged, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mat, merged, atol=1e-6, rtol=1e-6)


def test_unmerge_restores_base_weights(setup):
    _, variables, method, delta, _ = setup
    delta = _perturb(delta)
    back = method.unmerge(method.merge(variables, delta, setup.sites), delta, setup.sites)
    for (p, w0), w in zip(paths.flatten(variables).items(), jax.tree.leaves(back)):
        # |(W0 + D) - D - W0| <= 2 ulp of the largest magnitude involved.
        np.testing.assert_allclose(w, w0, atol=4 * np.finfo(np.float32).eps * (1 + float(jnp.abs(w0).max())))


def test_merged_weight_is_w0_plus_scaled_product(setup):
    _, variables, method, delta, _ = setup
    delta = _perturb(delta)
    merged = paths.flatten(method.merge(variables, delta, setup.sites))
    base = paths.flatten(variables)
    flat_d = paths.flatten(delta)
    for p, a in flat_d.items():
        if p[-1] != "lora_A":
            continue
        b = np.asarray(flat_d[p[:-1] + ("lora_B",)], np.float64)
        want = np.asarray(base[p[:-1]], np.float64) + (8 / 4) * np.asarray(a, np.float64) @ b
        np.testing.assert_allclose(merged[p[:-1]], want, atol=1e-5)


class _OneDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="proj")(x)


@pytest.mark.parametrize("rslora", [False, True])
def test_factored_forward_matches_plain_jnp(rslora):
    model = _OneDense()
    x = jax.random.normal(jax.random.key(0), (5, 12))
    variables = model.init(jax.random.key(1), x)
    method = jpeft.lora(("proj",), rank=3, alpha=6, use_rslora=rslora)
    sites = jpeft.probe(model.apply, variables, x)
    delta = _perturb(method.init(jax.random.key(2), variables, sites))
    a = delta["params"]["proj"]["kernel"]["lora_A"]
    b = delta["params"]["proj"]["kernel"]["lora_B"]
    w, bias = variables["params"]["proj"]["kernel"], variables["params"]["proj"]["bias"]
    s = 6 / math.sqrt(3) if rslora else 6 / 3
    want = x @ w + bias + s * (x @ a) @ b
    got = jpeft.wrap(model.apply, method, sites)(variables, delta, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert method.config["scaling"] == pytest.approx(s)


def test_gradients_match_between_factored_and_materialised(setup):
    model, variables, method, delta, batch = setup
    delta = _perturb(delta)

    def loss(mode):
        f = jpeft.wrap(model.apply, method, setup.sites, mode=mode)
        return lambda d: jnp.sum(f(variables, d, **batch) ** 2)
    g1 = jax.grad(loss("factored"))(delta)
    g2 = jax.grad(loss("materialised"))(delta)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


def _grad_flops(model, variables, method, delta, batch, mode, sites):
    f = jpeft.wrap(model.apply, method, sites, mode=mode)
    g = jax.jit(jax.grad(lambda d, p: jnp.sum(f(p, d, **batch) ** 2)))
    cost = g.lower(delta, variables).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


def test_factored_form_never_forms_the_full_weight_gradient(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.lora("all-linear", rank=2, alpha=2, exclude=("classifier",))
    delta = method.init(jax.random.key(0), variables, tiny_sites)
    fact = _grad_flops(model, variables, method, delta, tiny_batch, "factored", tiny_sites)
    mat = _grad_flops(model, variables, method, delta, tiny_batch, "materialised", tiny_sites)
    # Materialised pays, per adapted [in, out] matrix, one [in, out] gradient x^T dy (2*N*in*out
    # FLOPs for N tokens) plus the merge; the factored form pays O(N * r * (in + out)).
    n_tokens = int(np.prod(tiny_batch["input_ids"].shape))
    flat = paths.flatten(variables)
    full_grad = sum(2 * n_tokens * flat[p[:-1]].shape[0] * flat[p[:-1]].shape[1]
                    for p in paths.flatten(delta) if p[-1] == "lora_A")
    assert mat - fact >= 0.5 * full_grad, (fact, mat, full_grad)


def test_counts_follow_the_formula(setup, tiny_config):
    _, variables, _, delta, _ = setup
    h, layers = tiny_config.hidden_size, tiny_config.num_hidden_layers
    assert jpeft.num_params(delta) == layers * 2 * 4 * (h + h)
    method = jpeft.lora("all-linear", rank=2, exclude=("classifier",))
    d = method.init(jax.random.key(0), variables, setup.sites)
    i = tiny_config.intermediate_size
    per_layer = 4 * 2 * (h + h) + 2 * (h + i) + 2 * (i + h)
    assert jpeft.num_params(d) == layers * per_layer
    assert "classifier" not in str(jax.tree.map(jnp.shape, d))


def test_layers_to_transform(setup):
    _, variables, _, _, _ = setup
    d = jpeft.lora(("query",), rank=2, layers_to_transform=[1]).init(jax.random.key(0), variables,
                                                                     setup.sites)
    selected = [paths.path_str(p) for p in paths.flatten(d) if p[-1] == "lora_A"]
    assert selected == ["params/bert/encoder/layer/1/attention/self/query/kernel/lora_A"]


def test_init_distributions():
    variables = {"params": {"proj": {"kernel": jnp.zeros((4096, 64))}}}
    sites = jpeft.probe(lambda v, x: x @ v["params"]["proj"]["kernel"], variables, jnp.ones((1, 4096)))
    k = jpeft.lora(("proj",), rank=16).init(jax.random.key(0), variables, sites)
    k = k["params"]["proj"]["kernel"]
    a = np.asarray(k["lora_A"])
    bound = 1 / math.sqrt(4096)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert np.std(a) == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert not np.any(np.asarray(k["lora_B"]))
    g = jpeft.lora(("proj",), rank=16, init="gaussian").init(jax.random.key(0), variables, sites)
    assert np.std(np.asarray(g["params"]["proj"]["kernel"]["lora_A"])) == pytest.approx(1 / 16, rel=0.02)


def test_dropout_only_with_a_key(setup):
    model, variables, _, delta, batch = setup
    method = jpeft.lora(targets=("query", "value"), rank=4, alpha=8, dropout=0.5)
    delta = _perturb(delta, scale=0.5)
    f = jpeft.wrap(model.apply, method, setup.sites)
    no_drop = jpeft.wrap(model.apply, jpeft.lora(("query", "value"), rank=4, alpha=8), setup.sites)
    np.testing.assert_array_equal(f(variables, delta, **batch), no_drop(variables, delta, **batch))
    a = f(variables, delta, **batch, delta_rng=jax.random.key(0))
    b = f(variables, delta, **batch, delta_rng=jax.random.key(1))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, f(variables, delta, **batch, delta_rng=jax.random.key(0)))


def test_dropout_keeps_the_expected_update():
    model = _OneDense()
    x = jnp.ones((20000, 12))
    variables = model.init(jax.random.key(1), x)
    method = jpeft.lora(("proj",), rank=3, alpha=3, dropout=0.3)
    sites = jpeft.probe(model.apply, variables, x)
    delta = _perturb(method.init(jax.random.key(2), variables, sites), scale=1.0)
    f = jpeft.wrap(model.apply, method, sites)
    base = model.apply(variables, x)
    with_drop = f(variables, delta, x, delta_rng=jax.random.key(3)) - base
    without = f(variables, delta, x) - base
    np.testing.assert_allclose(with_drop.mean(0), without.mean(0), atol=0.05 * float(jnp.abs(without).max()))


def test_errors(setup):
    _, variables, _, _, _ = setup
    sites = setup.sites
    with pytest.raises(ValueError, match="rank 40 is larger than the weight"):
        jpeft.lora(("query",), rank=40).init(jax.random.key(0), variables, sites)
    with pytest.raises(ValueError, match="positive integer"):
        jpeft.lora(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        jpeft.lora(dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        jpeft.lora(init="xavier")
    with pytest.raises(ValueError, match=r"matched none.*attention/self/query"):
        jpeft.lora(("qeury",)).init(jax.random.key(0), variables, sites)
    with pytest.raises(ValueError, match="mode"):
        jpeft.wrap(lambda p: p, jpeft.lora(), mode="fused")
    with pytest.raises(ValueError, match=r"needs the model's contraction sites.*jpeft.probe"):
        jpeft.lora(("query",)).init(jax.random.key(0), variables)
    with pytest.raises(ValueError, match=r"none can be adapted.*LayerNorm/scale: not a contraction "
                                         r"weight \(used by"):
        jpeft.lora(("attention/output/LayerNorm",)).init(jax.random.key(0), variables, sites)


def test_dropout_in_materialised_mode_is_an_error(setup):
    model, variables, _, delta, batch = setup
    method = jpeft.lora(("query", "value"), rank=4, alpha=8, dropout=0.1)
    f = jpeft.wrap(model.apply, method, setup.sites, mode="materialised")
    with pytest.raises(ValueError, match=r"dropout=0.1 cannot be applied in mode='materialised'"):
        f(variables, delta, **batch, delta_rng=jax.random.key(0))
    np.testing.assert_array_equal(f(variables, delta, **batch), model.apply(variables, **batch))


def test_plain_jax_model_and_weights_used_outside_contractions():
    """A raw-einsum model is adapted through its data flow; a weight also used by another op
    (a tied embedding: a lookup and a contraction) gets the edited weight at the lookup, so the
    factored form equals the merged model."""
    def apply(v, ids):
        emb = v["embed"]                                  # [vocab, d]: lookup and tied output
        h = emb[ids]
        h = jnp.einsum("btd,df->btf", h, v["proj"])
        return jnp.einsum("btd,vd->btv", h, emb)
    v = {"embed": jax.random.normal(jax.random.key(0), (11, 4)),
         "proj": jax.random.normal(jax.random.key(1), (4, 4))}
    ids = jnp.array([[1, 2, 3]])
    sites = jpeft.probe(apply, v, ids)
    assert sites.contractions[("proj",)].contract == (0,)
    assert sites.contractions[("embed",)].contract == (1,)        # contracted over d: [V, d]
    assert "gather" in sites.contractions[("embed",)].other_uses
    method = jpeft.lora(("proj", "embed"), rank=2)
    delta = _perturb(method.init(jax.random.key(0), v, sites))
    assert delta["embed"]["lora_A"].shape == (4, 2) and delta["embed"]["lora_B"].shape == (2, 11)
    want = apply(method.merge(v, delta, sites), ids)
    for mode in ("factored", "materialised"):
        out = jpeft.wrap(apply, method, sites, mode=mode)(v, delta, ids)
        np.testing.assert_allclose(out, want, atol=1e-5)
    only_proj = jpeft.lora(("proj",), rank=2)
    d2 = _perturb(only_proj.init(jax.random.key(0), v, sites))
    want = apply({**v, "proj": v["proj"] + 4.0 * d2["proj"]["lora_A"] @ d2["proj"]["lora_B"]}, ids)
    np.testing.assert_allclose(jpeft.wrap(apply, only_proj, sites)(v, d2, ids), want, atol=1e-5)


@pytest.mark.slow
def test_minilm_qv_r8_has_73728_adapter_params(minilm, minilm_sites):
    variables = {"params": minilm.params}
    delta = jpeft.lora(("query", "value"), rank=8, alpha=8).init(jax.random.key(0), variables,
                                                                 minilm_sites)
    assert jpeft.num_params(delta) == 73_728


@pytest.mark.torch
@pytest.mark.parametrize("targets", [("query", "value"), "all-linear"])
def test_count_matches_hugging_face_peft(minilm, minilm_sites, targets):
    require("torch")
    transformers = require("transformers")
    peft = require("peft")
    from jpeft.data.embedded import minilm_dir
    # Our MiniLM uses mean pooling (no pooler), so compare with a BertModel without one.
    hf = transformers.BertModel.from_pretrained(str(minilm_dir()), local_files_only=True,
                                                add_pooling_layer=False)
    hf_targets = list(targets) if isinstance(targets, tuple) else targets
    model = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=8, target_modules=hf_targets))
    trainable, _ = model.get_nb_trainable_parameters()
    delta = jpeft.lora(targets, rank=8, exclude=("classifier",)).init(
        jax.random.key(0), {"params": minilm.params}, minilm_sites)
    assert jpeft.num_params(delta) == trainable


def test_layers_to_transform_indexes_stacked_layers():
    """On kernels stacked [L, in, out] by nn.scan, layers_to_transform picks slices along L: the
    factors hold only those slices, and only they change in the merged weight."""
    import zoo
    s = zoo.build("linen_scan_remat")                        # three layers, kernels [3, ., .]
    sites = jpeft.probe(s.apply, s.params, *s.args)
    method = jpeft.lora(("up", "down"), rank=2, layers_to_transform=[1])
    delta = _perturb(method.init(jax.random.key(0), s.params, sites))
    up = delta["params"]["layers"]["up"]["kernel"]
    assert up["lora_A"].shape == (1, 16, 2) and up["lora_B"].shape == (1, 2, 32)
    merged = method.merge(s.params, delta, sites)
    w0 = np.asarray(s.params["params"]["layers"]["up"]["kernel"])
    w = np.asarray(merged["params"]["layers"]["up"]["kernel"])
    np.testing.assert_array_equal(w[[0, 2]], w0[[0, 2]])
    np.testing.assert_allclose(w[1], w0[1] + (8 / 2) * np.asarray(up["lora_A"][0] @ up["lora_B"][0]),
                               atol=1e-5)
    f = jax.jit(jpeft.wrap(s.apply, method, sites))
    np.testing.assert_allclose(f(s.params, delta, *s.args), s.apply(merged, *s.args), atol=1e-5)
    grads = jax.grad(lambda d: jnp.sum(f(s.params, d, *s.args) ** 2))(delta)
    assert jax.tree.structure(grads) == jax.tree.structure(delta)
    with pytest.raises(ValueError, match=r"layers_to_transform \[5\] out of range for the stacked "
                                         r"weight params/layers/up/kernel with 3 layers"):
        jpeft.lora(("up",), layers_to_transform=[5]).init(jax.random.key(0), s.params, sites)


def test_dropout_under_scan_draws_a_mask_per_layer():
    """LoRA dropout on a ``[L, in, out]`` weight read by a ``lax.scan`` over layers: each layer
    draws its own mask. Every layer gets the same input, weight and factors, so the layers'
    outputs differ only by their masks: equal without dropout, all different with it."""
    layers, d = 3, 8

    def apply(p, x):
        return jax.lax.scan(lambda c, w: (c, x @ w), 0.0, p["w"])[1]     # [L, T, d]
    w = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (d, d)), (layers, d, d))
    params = {"w": w}
    x = jax.random.normal(jax.random.key(1), (16, d))
    sites = jpeft.probe(apply, params, x)
    method = jpeft.lora(("w",), rank=4, alpha=4, dropout=0.5)
    delta = method.init(jax.random.key(2), params, sites)
    a = jax.random.normal(jax.random.key(3), delta["w"]["lora_A"].shape[1:])
    b = jax.random.normal(jax.random.key(4), delta["w"]["lora_B"].shape[1:])
    delta = {"w": {"lora_A": jnp.broadcast_to(a, (layers, *a.shape)),
                   "lora_B": jnp.broadcast_to(b, (layers, *b.shape))}}
    f = jax.jit(jpeft.wrap(apply, method, sites))
    plain = f(params, delta, x)
    for i in range(1, layers):
        np.testing.assert_allclose(plain[i], plain[0], rtol=1e-6)
    dropped = f(params, delta, x, delta_rng=jax.random.key(5))
    assert not np.allclose(dropped[0], plain[0])
    for i in range(layers):
        for j in range(i):
            assert not np.allclose(dropped[i], dropped[j]), (i, j)
