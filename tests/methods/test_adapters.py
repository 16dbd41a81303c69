"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, scaled, learned-scale, multi-head) on the linen
BERT and the NNX decoder, against references written with flax's own method interception."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
import zoo
from conftest import perturb
from jpeft.methods import adapters


@pytest.fixture(scope="module")
def bert():
    s = zoo.build("linen_bert")
    return s, jpeft.probe(s.apply, s.params, *s.args)


def _adapter_ref(x, a, act, scale=1.0):
    return scale * (act(x @ a["down"] + a["down_bias"]) @ a["up"] + a["up_bias"])


METHODS = {
    "houlsby": lambda: adapters.houlsby(reduction_factor=4),
    "pfeiffer": lambda: adapters.pfeiffer(reduction_factor=4, ln_before=True),
    "parallel": lambda: adapters.parallel((adapters.ATTENTION_PARALLEL, adapters.FFN_PARALLEL),
                                          bottleneck_size=6, activation="gelu"),
    "parallel_x4": lambda: adapters.parallel((adapters.ATTENTION_PARALLEL, adapters.FFN_PARALLEL),
                                             bottleneck_size=6, activation="gelu", scaling=4.0),
    "scaled_parallel": lambda: adapters.scaled_parallel(bottleneck_size=8),
    "learned_scale": lambda: adapters.scaled_parallel(bottleneck_size=8, scaling="learned"),
    "multihead": lambda: adapters.multihead_parallel(bottleneck_size=8, activation="silu"),
}


@pytest.mark.parametrize("name", ["houlsby", "learned_scale", "multihead", "pfeiffer"])
def test_zero_init_is_the_base_model_and_counts_follow_the_formula(bert, name):
    s, sites = bert
    method = METHODS[name]()
    delta = method.init(jax.random.key(0), s.params, sites)
    f = jax.jit(jpeft.wrap(s.apply, method, sites))
    np.testing.assert_array_equal(f(s.params, delta, *s.args), jax.jit(s.apply)(s.params, *s.args))
    found = adapters.resolve(sites, [adapters.Placement.from_json(p)
                                     for p in method.config["placements"]])
    cfg = method.config
    expected = 0
    for site in found:
        m = cfg["bottleneck_size"] or site.d_out // cfg["reduction_factor"]
        n = adapters.count(site.d_in, m, site.d_out, ln_before=cfg["ln_before"],
                           learned_scale=cfg["scaling"] == "learned")
        if site.heads:     # N heads, each d_in x m/N and m/N x D_h: same budget as one adapter
            n = adapters.count(site.d_in, m // site.heads, site.d_out) * site.heads
        expected += n * int(np.prod(site.scanned or (1,)))
    assert jpeft.num_params(delta) == expected
    # 2 layers x (attention + FFN) for Houlsby, FFN only for Pfeiffer
    assert len(found) == {"houlsby": 4, "parallel": 4}.get(name, 2)


def test_houlsby_and_parallel_equal_flax_interception(bert):
    """Trained-looking (random) adapters: the wrapped forward equals the base model with the
    adapters added by ``nn.intercept_methods`` on the output projections (Houlsby) and from the
    attention / intermediate inputs (parallel; and with a fixed ``scaling`` of 4, applied to the
    adapter's output)."""
    s, sites = bert
    for name in ("houlsby", "parallel", "parallel_x4"):
        method = METHODS[name]()
        delta = perturb(method.init(jax.random.key(0), s.params, sites), scale=0.3)
        got = jpeft.wrap(s.apply, method, sites)(s.params, delta, *s.args)
        flat = {tuple(k.split("/")): v for k, v in _groups(delta).items()}
        act = jax.nn.relu if name == "houlsby" else jax.nn.gelu
        inputs = {}

        scale = 4.0 if name == "parallel_x4" else 1.0

        def icpt(next_fun, args, kwargs, context, flat=flat, act=act, name=name, scale=scale):
            path = context.module.path
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if path[-1:] in (("attention",), ("intermediate",)):     # the sublayer's input
                inputs[path[:-1]] = args[0]
            out = next_fun(*args, **kwargs)
            a = flat.get(path + ("out",))
            if a is not None:
                x = out if name == "houlsby" else inputs[path[:4]]
                out = out + _adapter_ref(x, a, act, scale)
            return out
        with nn.intercept_methods(icpt):
            want = s.apply(s.params, *s.args)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(want, s.apply(s.params, *s.args), atol=1e-4)


def _groups(delta):
    from jpeft.core import paths as paths_lib
    out = {}
    for path, v in paths_lib.flatten(delta).items():
        out.setdefault("/".join(path[:-1]), {})[path[-1]] = v
    return out


def test_multihead_parallel_adds_per_head_adapters_to_the_context(bert):
    s, sites = bert
    method = METHODS["multihead"]()
    delta = perturb(method.init(jax.random.key(1), s.params, sites), scale=0.3)
    got = jpeft.wrap(s.apply, method, sites)(s.params, delta, *s.args)
    groups = _groups(delta)
    inputs = {}

    def icpt(next_fun, args, kwargs, context):
        path = context.module.path
        if context.method_name == "__call__" and path[-1:] == ("attention",):
            inputs[path] = args[0]
        if context.method_name == "__call__" and path[-1:] == ("self",):
            # recompute the context by hand with the per-head adapter added
            a = groups["/".join(path) + "/context"]
            x = inputs[path[:-1]]
            h = jax.nn.silu(jnp.einsum("btd,ndm->btnm", x, a["down"]) + a["down_bias"])
            add = jnp.einsum("btnm,nmo->btno", h, a["up"]) + a["up_bias"]
            out = next_fun(*args, **kwargs)
            b, t, hid = out.shape
            return out + add.reshape(b, t, hid)
        return next_fun(*args, **kwargs)
    with nn.intercept_methods(icpt):
        want = s.apply(s.params, *s.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_decoder_adapters_scanned_equal_unrolled():
    """The same per-layer adapters on the NNX decoder unrolled and ``nnx.scan``-stacked (weights
    stacked along L) give the same logits; zero init is the base; grads reach every layer."""
    un, sc = zoo.build("nnx_decoder"), zoo.build("nnx_decoder_scan")
    method = adapters.houlsby(reduction_factor=4, activation="silu")
    s_un = jpeft.probe(un.apply, un.params, *un.args)
    s_sc = jpeft.probe(sc.apply, sc.params, *sc.args)
    d_sc = perturb(method.init(jax.random.key(0), sc.params, s_sc), scale=0.3)
    assert jax.tree.leaves(d_sc)[0].shape[0] == 2          # [L, ...]
    # unstack: layers/<i>/... in the unrolled tree
    from jpeft.core import paths as paths_lib
    flat = {}
    for path, v in paths_lib.flatten(d_sc).items():
        i = path.index("layers")
        for layer in range(v.shape[0]):
            flat[path[:i + 1] + (str(layer),) + path[i + 1:]] = v[layer]
    d_un = paths_lib.unflatten(flat)
    # the scanned model's weights, unstacked, are the unrolled model's
    params_un = jax.tree.map(lambda x: x, un.params)
    for i in range(2):
        params_un["model"]["layers"][i] = jax.tree.map(
            lambda w, i=i: w[i], sc.params["model"]["layers"])
    params_un["model"]["embed_tokens"] = sc.params["model"]["embed_tokens"]
    params_un["model"]["norm"] = sc.params["model"]["norm"]
    if "lm_head" in sc.params:
        params_un["lm_head"] = sc.params["lm_head"]
    got_sc = jpeft.wrap(sc.apply, method, s_sc)(sc.params, d_sc, *sc.args)
    got_un = jpeft.wrap(un.apply, method, s_un)(params_un, d_un, *un.args)
    np.testing.assert_allclose(got_sc, got_un, rtol=2e-5, atol=2e-5)
    zero = method.init(jax.random.key(0), sc.params, s_sc)
    np.testing.assert_array_equal(
        jax.jit(jpeft.wrap(sc.apply, method, s_sc))(sc.params, zero, *sc.args),
        jax.jit(sc.apply)(sc.params, *sc.args))
    g = jax.grad(lambda d: jpeft.wrap(sc.apply, method, s_sc)(sc.params, d, *sc.args).sum())(d_sc)
    for leaf in jax.tree.leaves(g):
        assert np.all(np.abs(np.asarray(leaf)).reshape(2, -1).sum(1) > 0)


def test_train_step_changes_only_the_adapters(bert):
    s, sites = bert
    method = jpeft.compose(adapter=adapters.houlsby(reduction_factor=4),
                           head=jpeft.full_finetune(("classifier",)))
    delta = method.init(jax.random.key(0), s.params, sites)
    f = jpeft.wrap(s.apply, method, sites)
    labels = jnp.array([0, 1])

    def loss(params, d, batch, key):
        logits = f(params, d, *s.args)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), {}
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss, opt, method=method)
    state = jpeft.init_opt_state(opt, delta, method=method)
    l0 = float(loss(s.params, delta, None, None)[0])
    d = delta
    for _ in range(5):
        d, state, metrics = step(s.params, d, state, None, jax.random.key(0))
    assert float(loss(s.params, d, None, None)[0]) < l0
    up = jax.tree.leaves(d["adapter"])
    assert any(float(jnp.abs(x).sum()) > 0 for x in up)


def test_config_rebuilds_and_errors_name_the_problem(bert):
    s, sites = bert
    method = adapters.scaled_parallel(bottleneck_size=8, scaling="learned", ln_before=True)
    again = adapters.from_config(method.config)
    assert again.config == method.config
    d1 = method.init(jax.random.key(0), s.params, sites)
    d2 = again.init(jax.random.key(0), s.params, sites)
    assert jax.tree.map(jnp.shape, d1) == jax.tree.map(jnp.shape, d2)
    with pytest.raises(ValueError, match="materialised"):
        jpeft.wrap(s.apply, method, sites, mode="materialised")(s.params, d1, *s.args)
    with pytest.raises(ValueError, match=r"no out site matches 'nothing'.*e\.g\."):
        adapters.bottleneck([adapters.Placement("nothing")]).init(jax.random.key(0), s.params,
                                                                  sites)
    with pytest.raises(ValueError, match="activation"):
        adapters.houlsby(activation="sigmoid")
    with pytest.raises(ValueError, match=r"bottleneck size 0 < 1"):
        adapters.houlsby(reduction_factor=1000).init(jax.random.key(0), s.params, sites)
    with pytest.raises(ValueError, match=r"not divisible by its 4 heads"):
        adapters.multihead_parallel(bottleneck_size=6).init(jax.random.key(0), s.params, sites)
    with pytest.raises(ValueError, match="merged"):
        jpeft.core.method.require_merge(method)


@pytest.mark.parametrize("preset", ["paper", "adapterhub"])
def test_mam_is_prefix_plus_scaled_parallel_ffn_adapter(bert, preset):
    from jpeft.methods import prefix as prefix_lib
    s, sites = bert
    method = adapters.mam(prefix_length=4, bottleneck_size=8, preset=preset)
    delta = method.init(jax.random.key(0), s.params, sites)
    parts = method.config["compose"]
    assert parts["prefix"]["num_virtual_tokens"] == 4
    assert parts["prefix"]["reparametrize"] == (preset == "adapterhub")
    assert parts["adapter"]["scaling"] == 4.0
    assert parts["adapter"]["placements"] == [adapters.FFN_PARALLEL.to_json()]
    # the adapter part starts at zero: MAM starts as prefix tuning alone
    pre = prefix_lib.from_config(parts["prefix"])
    got = jpeft.wrap(s.apply, method, sites)(s.params, delta, *s.args)
    want = jpeft.wrap(s.apply, pre, sites)(s.params, delta["prefix"], *s.args)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    m = 8 if preset == "paper" else 32 // 2
    assert jpeft.num_params(delta["adapter"]) == 2 * adapters.count(32, m, 32)
    with pytest.raises(ValueError, match="preset"):
        adapters.mam(preset="other")


def test_phm_weight_is_a_sum_of_kronecker_products():
    rng = np.random.default_rng(0)
    rule, s_, t_ = (rng.standard_normal(sh).astype(np.float32)
                    for sh in ((4, 4, 4), (4, 3, 2), (4, 2, 5)))
    want = sum(np.kron(rule[i], s_[i] @ t_[i]) for i in range(4))
    np.testing.assert_allclose(adapters.phm_weight(rule, s_, t_), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plus_plus", [True, False])
def test_compacter_is_an_adapter_with_phm_weights_and_shared_rules(bert, plus_plus):
    """Compacter's forward equals the dense bottleneck adapter whose W_down and W_up are the PHM
    weights built by hand; the rule A is one array for every adapter; counts follow the formula;
    zero start."""
    s, sites = bert
    method = adapters.compacter(plus_plus=plus_plus, reduction_factor=4)
    delta = method.init(jax.random.key(0), s.params, sites)
    np.testing.assert_array_equal(jax.jit(jpeft.wrap(s.apply, method, sites))(
        s.params, delta, *s.args), jax.jit(s.apply)(s.params, *s.args))
    n_sites = 2 if plus_plus else 4
    per = (32 + 8) + (8 + 32) + 8 + 32            # r (d + m) + r (m + d) + m + d, n = 4, r = 1
    assert jpeft.num_params(delta) == 4 ** 3 + n_sites * per
    delta = perturb(delta, scale=0.3)
    got = jpeft.wrap(s.apply, method, sites)(s.params, delta, *s.args)
    rule = np.asarray(delta[adapters.PHM_RULE])
    dense_delta = {}
    for path, a in _groups({k: v for k, v in delta.items() if k != adapters.PHM_RULE}).items():
        kron = lambda s_, t_: sum(np.kron(rule[i], np.asarray(s_[i]) @ np.asarray(t_[i]))
                                  for i in range(4))
        dense_delta[path] = {"down": kron(a["down_s"], a["down_t"]),
                             "up": kron(a["up_s"], a["up_t"]),
                             "down_bias": a["down_bias"], "up_bias": a["up_bias"]}
    from jpeft.core import paths as paths_lib
    flat = {tuple(p.split("/")) + (n,): v for p, arrs in dense_delta.items()
            for n, v in arrs.items()}
    dense = adapters.bottleneck(
        (adapters.FFN_SEQUENTIAL,) if plus_plus else (adapters.ATTENTION_SEQUENTIAL,
                                                      adapters.FFN_SEQUENTIAL),
        reduction_factor=4, activation="gelu")
    want = jpeft.wrap(s.apply, dense, sites)(s.params, paths_lib.unflatten(flat), *s.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert adapters.from_config(method.config).config == method.config
