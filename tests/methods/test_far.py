"""FAR against the math: column scores and selection, exact densities, W0 + scatter_c(D), factored ==
merged == materialised, gradients only for the kept columns, cost, sharding, stored form, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jpeft
from jpeft.core import paths
from jpeft.methods.far import (BERT_FFN, far, far_magnitude_scores,
                               far_report, far_scores, far_select,
                               kept_count)

FFN = ("intermediate/dense", "output/dense")


from conftest import perturb as _perturb


@pytest.fixture
def setup(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    columns = far_select(far_magnitude_scores(variables), 0.25)
    method = far(columns)
    return (model, variables, columns, method, method.init(jax.random.key(0), variables), tiny_batch,
            tiny_sites)


class _TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="out")(jax.nn.gelu(nn.Dense(10, name="up")(x)))


# --------------------------------------------------------------------------------------------
# Stage 1


def test_bert_ffn_targets_are_the_two_ffn_matrices_per_layer(tiny_bert, tiny_config):
    _, params = tiny_bert
    got = sorted(paths.path_str(p) for p in paths.flatten(far_magnitude_scores({"params": params})))
    want = sorted(f"params/bert/encoder/layer/{i}/{m}/kernel"
                  for i in range(tiny_config.num_hidden_layers) for m in FFN)
    assert got == want       # attention/output/dense is not a feed-forward matrix
    assert not any("attention" in p for p in got)


def test_scores_are_the_l1_change_and_l1_norm_per_column(tiny_bert):
    _, params = tiny_bert
    variables = {"params": params}
    warm = _perturb(variables, scale=0.05)
    got = paths.flatten(far_scores(variables, warm))
    got_delta = paths.flatten(far_scores(variables, jax.tree.map(jnp.subtract, warm, variables),
                                         warm_is_delta=True))
    mag = paths.flatten(far_magnitude_scores(variables))
    no_bias = paths.flatten(far_magnitude_scores(variables, include_bias=False, normalize=True))
    base, w = paths.flatten(variables), paths.flatten(warm)
    assert len(got) == 4
    for p, s in got.items():
        bp = p[:-1] + ("bias",)
        w0, b0 = np.asarray(base[p], np.float64), np.asarray(base[bp], np.float64)
        dw, db = np.asarray(w[p], np.float64) - w0, np.asarray(w[bp], np.float64) - b0
        want = np.array([np.abs(dw[:, j]).sum() + abs(db[j]) for j in range(w0.shape[1])])
        np.testing.assert_allclose(s, want, rtol=1e-5)
        np.testing.assert_allclose(got_delta[p], want, rtol=1e-5)
        np.testing.assert_allclose(mag[p], np.abs(w0).sum(0) + np.abs(b0), rtol=1e-5)
        np.testing.assert_allclose(no_bias[p], np.abs(w0).mean(0), rtol=1e-5)


def test_select_keeps_the_top_columns_sorted_as_int32():
    s = np.array([0.5, 3.0, 1.0, 3.0, 2.0, 0.0, 2.5, 0.1, 0.2, 0.3])
    cols = far_select({"m": {"kernel": s}}, 0.3)["m"]["kernel"]
    assert cols.dtype == np.int32
    np.testing.assert_array_equal(cols, [1, 3, 6])
    # Ties go to the lower index: of the two 3.0 only column 1 fits in k = 1.
    np.testing.assert_array_equal(far_select({"m": {"kernel": s}}, 0.1)["m"]["kernel"], [1])
    np.testing.assert_array_equal(far_select({"m": {"kernel": s}}, 1.0)["m"]["kernel"], np.arange(10))


def test_rounding_rule_is_round_half_up_of_the_written_decimal():
    assert kept_count(0.15, 10) == 2            # 1.5 -> 2 (0.15 * 10 is 1.4999... in binary)
    assert kept_count(0.14, 10) == 1
    assert kept_count(0.25, 64) == 16
    assert kept_count(0.1, 64) == 6             # 6.4 -> 6
    assert kept_count(0.05, 10) == 1            # 0.5 -> 1
    assert kept_count(1, 7) == 7


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.125])
def test_density_exactly_as_requested(tiny_bert, fraction):
    _, params = tiny_bert
    variables = {"params": params}
    columns = far_select(far_magnitude_scores(variables), fraction)
    delta = far(columns).init(jax.random.key(0), variables)
    rep = far_report(variables, columns)
    # Independent count: every FFN matrix [in, out] with its bias keeps fraction * out columns.
    flat = paths.flatten(variables)
    kernels = [p for p in flat if p[-1] == "kernel" and paths.matches(p[:-1], BERT_FFN)]
    want_trainable = sum(int(fraction * flat[p].shape[1]) * (flat[p].shape[0] + 1) for p in kernels)
    targeted = sum(flat[p].shape[1] * (flat[p].shape[0] + 1) for p in kernels)
    assert rep.trainable == jpeft.num_params(delta) == want_trainable
    assert rep.targeted == targeted
    assert rep.column_density == fraction and rep.param_density == fraction
    assert rep.matrices == len(kernels) == 4
    for p, c in paths.flatten(columns).items():
        assert c.size == fraction * flat[p].shape[1]


def test_density_when_the_fraction_does_not_divide_is_the_rounded_count(tiny_bert):
    _, params = tiny_bert
    variables = {"params": params}
    columns = far_select(far_magnitude_scores(variables), 0.1)
    rep = far_report(variables, columns)
    assert rep.columns_kept == 2 * (6 + 3)          # round(6.4) + round(3.2) per layer
    assert rep.column_density == 18 / 192
    assert rep.trainable == jpeft.num_params(far(columns).init(jax.random.key(0), variables))


def test_global_budget_ranks_across_matrices():
    scores = {"a": {"kernel": np.array([5.0, 1.0, 4.0, 0.0])},
              "b": {"kernel": np.array([3.0, 6.0, 2.0, 0.5, 0.2, 0.1])},
              "c": {"kernel": np.array([0.3, 0.4])}}
    got = far_select(scores, 0.25, budget="global")    # round(0.25 * 12) = 3: 6.0, 5.0, 4.0
    assert set(got) == {"a", "b"}                     # c gets nothing and is left out
    np.testing.assert_array_equal(got["a"]["kernel"], [0, 2])
    np.testing.assert_array_equal(got["b"]["kernel"], [1])
    assert sum(c["kernel"].size for c in got.values()) == 3


# --------------------------------------------------------------------------------------------
# Stage 2: forward, merge, gradients


def test_zero_delta_is_exactly_the_base_model(setup):
    model, variables, _, method, delta, batch, sites = setup
    # Op by op (not jitted: under jit XLA may fuse the frozen matmul differently in the two
    # programs, which moves the last bit), a zero delta adds exactly zero.
    base = model.apply(variables, **batch)
    for mode in ("factored", "materialised"):
        out = jpeft.wrap(model.apply, method, sites, mode=mode)(variables, delta, **batch)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(base))
    merged = jax.jit(method.merge)(variables, delta)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)


def test_factored_forward_matches_plain_numpy():
    model = _TwoDense()
    x = jax.random.normal(jax.random.key(0), (4, 3, 6))
    variables = model.init(jax.random.key(1), x)
    columns = {"params": {"up": {"kernel": np.array([1, 4, 9])}, "out": {"kernel": np.array([2])}}}
    method = far(columns)
    sites = jpeft.probe(model.apply, variables, x)
    delta = _perturb(method.init(jax.random.key(2), variables), scale=0.5)
    p, d = paths.flatten(variables), paths.flatten(delta)
    f64 = lambda a: np.asarray(a, np.float64)

    def dense(h, name, cols):      # plain numpy: W = W0 with columns cols += D, likewise the bias
        w, b = f64(p[("params", name, "kernel")]).copy(), f64(p[("params", name, "bias")]).copy()
        w[:, cols] += f64(d[("params", name, "kernel")])
        b[cols] += f64(d[("params", name, "bias")])
        return h @ w + b
    h = f64(jax.nn.gelu(jnp.asarray(dense(f64(x), "up", [1, 4, 9]), jnp.float32)))
    want = dense(h, "out", [2])
    got, merged = jax.jit(lambda v, d: (jpeft.wrap(model.apply, method, sites)(v, d, x),
                                        model.apply(method.merge(v, d), x)))(variables, delta)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(merged, want, atol=1e-5)


def test_merge_equals_factored_and_materialised_and_touches_only_kept_entries(setup):
    model, variables, columns, method, delta, batch, sites = setup
    delta = _perturb(delta)
    @jax.jit
    def run(variables, delta):
        fact = jpeft.wrap(model.apply, method, sites)(variables, delta, **batch)
        mat = jpeft.wrap(model.apply, method, sites, mode="materialised")(variables, delta, **batch)
        merged_params = method.merge(variables, delta)
        return (fact, mat, merged_params, model.apply(merged_params, **batch),
                model.apply(variables, **batch), method.unmerge(merged_params, delta))
    fact, mat, merged_params, merged, base_out, back = run(variables, delta)
    assert not np.allclose(fact, base_out, atol=1e-3)
    np.testing.assert_allclose(fact, merged, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mat, merged, atol=1e-6, rtol=1e-6)
    # The merged tree differs from the base exactly at the kept kernel columns and bias entries.
    base, merged_flat, cols = paths.flatten(variables), paths.flatten(merged_params), paths.flatten(columns)
    changed = {p: np.asarray(merged_flat[p]) != np.asarray(base[p]) for p in base}
    for p, ch in changed.items():
        kernel = p if p in cols else p[:-1] + ("kernel",)
        if kernel not in cols:
            assert not ch.any(), paths.path_str(p)
            continue
        mask = np.zeros(ch.shape[-1], bool)
        mask[cols[kernel]] = True
        np.testing.assert_array_equal(ch, np.broadcast_to(mask, ch.shape))
    for w, w0 in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        np.testing.assert_allclose(w, w0, atol=4 * np.finfo(np.float32).eps * (1 + float(jnp.abs(w0).max())))


def test_gradients_are_the_kept_columns_of_the_full_gradient(setup):
    model, variables, columns, method, delta, batch, sites = setup
    delta = _perturb(delta)
    modes = ("factored", "materialised")

    @jax.jit
    def grads(variables, delta):
        # Reference: plain jax.grad of the model w.r.t. all its weights at the merged point.
        full = jax.grad(lambda v: jnp.sum(model.apply(v, **batch) ** 2))(method.merge(variables, delta))
        fs = [jpeft.wrap(model.apply, method, sites, mode=m) for m in modes]
        return full, [jax.grad(lambda d, f=f: jnp.sum(f(variables, d, **batch) ** 2))(delta) for f in fs]
    full, per_mode = grads(variables, delta)
    full, cols = paths.flatten(full), paths.flatten(columns)
    for g in per_mode:
        g = paths.flatten(g)
        assert set(g) == set(cols) | {p[:-1] + ("bias",) for p in cols}
        for p, gp in g.items():
            c = cols[p] if p in cols else cols[p[:-1] + ("kernel",)]
            np.testing.assert_allclose(gp, full[p][..., c], atol=1e-4, rtol=1e-4)


def test_training_moves_only_the_kept_entries(setup):
    model, variables, columns, method, delta, batch, sites = setup
    method = jpeft.compose(far=method, head=jpeft.full_finetune(("classifier",)))
    delta = method.init(jax.random.key(0), variables)
    f = jpeft.wrap(model.apply, method, sites)
    labels = jnp.array([0, 1, 1])

    def loss(params, d, b, key):
        return optax.softmax_cross_entropy_with_integer_labels(f(params, d, **b), labels).mean()
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss, opt)
    state = jpeft.init_opt_state(opt, delta)
    losses = []
    for i in range(5):
        delta, state, m = step(variables, delta, state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(delta["far"]))
    assert jpeft.num_params(delta["far"]) == far_report(variables, columns).trainable


def _grad(model, variables, method, delta, batch, mode, sites):
    f = jpeft.wrap(model.apply, method, sites, mode=mode)
    return jax.grad(lambda d, p: jnp.sum(f(p, d, **batch) ** 2))


def test_factored_form_never_forms_the_full_weight_gradient(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    columns = far_select(far_magnitude_scores(variables), 0.125)
    method = far(columns)
    delta = method.init(jax.random.key(0), variables)
    flat = paths.flatten(variables)
    full = {tuple(flat[p].shape) for p in paths.flatten(columns)}       # FFN kernels [in, out]
    kept = {s for p, c in paths.flatten(columns).items()
            for s in ((flat[p].shape[0], c.size), (c.size, flat[p].shape[0]))}
    dots, flops = {}, {}
    for mode in ("factored", "materialised"):
        g = _grad(model, variables, method, delta, tiny_batch, mode, tiny_sites)
        dots[mode] = _dot_output_shapes(jax.make_jaxpr(g)(delta, variables).jaxpr)
        cost = jax.jit(g).lower(delta, variables).compile().cost_analysis()
        flops[mode] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    # Materialised forms each selected FFN kernel's gradient x^T dy ([in, out]) and keeps k
    # columns; the factored form forms only x^T dy[:, c] ([in, k] or its transpose) and never an
    # [in, out] product in the backward pass (the forward's outputs are [B, T, out]).
    assert full & set(dots["materialised"]), dots["materialised"]
    assert not full & set(dots["factored"]), dots["factored"]
    assert kept & set(dots["factored"]), sorted(set(dots["factored"]))
    assert flops["factored"] < flops["materialised"], flops


# --------------------------------------------------------------------------------------------
# Sharding and storage


def test_delta_shardings_take_the_input_axis_of_the_weight(tiny_bert, mesh):
    _, params = tiny_bert
    variables = {"params": params}
    rules = [(r".*/intermediate/dense/kernel", P(None, "model")),
             (r".*/intermediate/dense/bias", P("model")),
             (r".*/[0-9]+/output/dense/kernel", P("model", None))]
    shard = jpeft.shard_by_rules(variables, mesh, rules)
    columns = far_select(far_magnitude_scores(variables), 0.25)
    method = far(columns)
    delta = jax.eval_shape(method.init, jax.random.key(0), variables)
    ds = jpeft.delta_shardings(method, shard, delta)
    layer = ds["params"]["bert"]["encoder"]["layer"]["0"]
    assert layer["intermediate"]["dense"]["kernel"].spec == P(None, None)
    assert layer["intermediate"]["dense"]["bias"].spec == P()
    assert layer["output"]["dense"]["kernel"].spec == P("model", None)
    assert layer["output"]["dense"]["bias"].spec == P()
    # The sharded factored forward equals the unsharded one.
    real = _perturb(method.init(jax.random.key(0), variables))
    x = np.random.default_rng(0).integers(1, 100, (4, 8)).astype(np.int32)
    f = jax.jit(jpeft.wrap(_apply, method, jpeft.probe(_apply, variables, x)))
    want = f(variables, real, x)
    got = f(jax.device_put(variables, shard), jax.device_put(real, ds), x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def _apply(variables, ids):
    from jpeft.models.bert import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig.tiny(num_labels=2, pooling="mean")).apply(
        variables, ids)


def test_saved_and_loaded_by_name(setup, tmp_path):
    """FAR's columns are the method's data: jpeft.save stores them with the delta and jpeft.load
    rebuilds the same method (columns and outputs identical)."""
    model, variables, columns, method, delta, batch, sites = setup
    delta = _perturb(delta)
    assert set(paths.flatten(method.data)) == set(paths.flatten(columns))
    jpeft.save(tmp_path / "far", method, delta)
    loaded = jpeft.load(tmp_path / "far", variables, sites)
    for a, b in zip(jax.tree.leaves(loaded.method.data), jax.tree.leaves(columns)):
        np.testing.assert_array_equal(a, b)
    jax.tree.map(np.testing.assert_array_equal, loaded.delta, delta)
    out = jax.jit(jpeft.wrap(model.apply, loaded.method, sites))(variables, loaded.delta, **batch)
    np.testing.assert_array_equal(
        out, jax.jit(jpeft.wrap(model.apply, method, sites))(variables, delta, **batch))


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan"), True, "0.1", None])
def test_fraction_outside_zero_one_is_an_error(fraction):
    with pytest.raises(ValueError, match=r"fraction must be .*\(0, 1\]"):
        far_select({"m": {"kernel": np.ones(8)}}, fraction)


def test_a_fraction_that_keeps_no_column_is_an_error(tiny_bert):
    _, params = tiny_bert
    scores = far_magnitude_scores({"params": params})
    with pytest.raises(ValueError, match=r"keeps no column of .*output/dense/kernel \(32 columns"):
        far_select(scores, 0.01)                          # round(0.32) = 0
    with pytest.raises(ValueError, match="keeps no column of the 192 columns"):
        far_select(scores, 0.001, budget="global")
    with pytest.raises(ValueError, match="budget"):
        far_select(scores, 0.5, budget="layer")


def test_malformed_columns_are_errors(tiny_bert):
    _, params = tiny_bert
    variables = {"params": params}
    k = ("params", "bert", "encoder", "layer", "0", "output", "dense", "kernel")
    tree = lambda c: paths.unflatten({k: c})
    with pytest.raises(ValueError, match="sorted and distinct"):
        far(tree(np.array([3, 1])))
    with pytest.raises(ValueError, match="sorted and distinct"):
        far(tree(np.array([1, 1])))
    with pytest.raises(ValueError, match="1-D integer"):
        far(tree(np.array([1.0, 2.0])))
    with pytest.raises(ValueError, match="no column kept"):
        far(tree(np.array([], np.int32)))
    with pytest.raises(ValueError, match="no columns given"):
        far({})
    with pytest.raises(ValueError, match="column 32 is out of range .* 32 columns"):
        far(tree(np.array([0, 32]))).init(jax.random.key(0), variables)
    bad = paths.unflatten({k[:-2] + ("dnese", "kernel"): np.array([0])})
    with pytest.raises(ValueError, match="no weight at .*dnese/kernel"):
        far(bad).init(jax.random.key(0), variables)
    with pytest.raises(ValueError, match="matched none"):
        far_magnitude_scores(variables, targets=r".*fnn")
    with pytest.raises(ValueError, match="no entry for 4 targeted kernels"):
        far_scores(variables, {"params": {}}, warm_is_delta=True)
    with pytest.raises(ValueError, match="not all finite"):
        far_select({"m": {"kernel": np.array([1.0, np.nan])}}, 0.5)


@pytest.mark.slow
def test_minilm_on_movie_sentences(minilm, minilm_sites, movie_data):
    from jpeft.models.tokenizer import encode
    variables = {"params": minilm.params}
    texts, _ = movie_data
    batch = encode(minilm.tokenizer, list(texts[:4]))
    columns = far_select(far_magnitude_scores(variables), 0.2)
    method = far(columns)
    delta = method.init(jax.random.key(0), variables)
    rep = far_report(variables, columns)
    # 6 layers x (intermediate: round(307.2) = 307 of 1536 columns x (384 + 1); output:
    # round(76.8) = 77 of 384 columns x (1536 + 1)).
    assert rep.trainable == jpeft.num_params(delta) == 6 * (307 * 385 + 77 * 1537)
    assert rep.column_density == 6 * (307 + 77) / (6 * (1536 + 384))
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    f = jax.jit(jpeft.wrap(minilm.model.apply, method, minilm_sites))
    base = jax.jit(minilm.model.apply)(variables, *args)
    np.testing.assert_allclose(f(variables, delta, *args), base, atol=1e-6, rtol=0)
    delta = _perturb(delta, scale=0.02)
    np.testing.assert_allclose(f(variables, delta, *args),
                               jax.jit(minilm.model.apply)(method.merge(variables, delta), *args),
                               atol=1e-5)


# --------------------------------------------------------------------------------------------
# Any contraction layout: plain-JAX models, references built by hand in numpy


def _layouts_apply(p, x):
    """One weight per layout (x: [b, t, 6]): a DenseGeneral-like ``q [6, 2, 3]`` (free (1, 2)),
    an attention-output ``o [2, 3, 5]`` (contract (0, 1)), an einsum weight contracted over its
    middle axis ``mid [2, 5, 4]``, a dot-batched ``batched [2, 4, 3]`` (stack (0,)), a weight that
    is the dot's first operand ``lhs [6, 4]`` and one whose free axes the dot holds in reverse
    order ``perm [3, 2, 6]``."""
    q = jnp.einsum("btd,dnh->btnh", x, p["q"]["kernel"]) + p["q"]["bias"]
    o = jnp.einsum("btnh,nhd->btd", jnp.tanh(q), p["o"]["kernel"]) + p["o"]["bias"]
    e = jnp.einsum("btd,sdh->sbth", o, p["mid"]["kernel"])
    z = (jnp.einsum("sbth,shf->sbtf", jnp.tanh(e), p["batched"]["kernel"])
         + p["batched"]["bias"][:, None, None, :])
    lhs = jax.lax.dot_general(p["lhs"]["kernel"], x, (((0,), (2,)), ((), ())))
    perm = jax.lax.dot_general(x, jnp.transpose(p["perm"]["kernel"], (2, 1, 0)),
                               (((2,), (0,)), ((), ())))
    return z, lhs, perm


def _scan_apply(p, x):
    """Three layers stacked ``[L=3, 6, 6]`` (bias ``[3, 6]``) under ``lax.scan``, then a head."""
    def body(h, w):
        return jnp.tanh(h @ w["kernel"] + w["bias"]), None
    h, _ = jax.lax.scan(body, x, p["layers"])
    return h @ p["head"]["kernel"]


def _normal(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.fixture(scope="module")
def layouts():
    q, qb, o, ob, mid, bt, btb, lhs, perm, x = _normal(0, (6, 2, 3), (2, 3), (2, 3, 5), (5,),
                                                       (2, 5, 4), (2, 4, 3), (2, 3), (6, 4),
                                                       (3, 2, 6), (2, 3, 6))
    params = {"q": {"kernel": q, "bias": qb}, "o": {"kernel": o, "bias": ob},
              "mid": {"kernel": mid}, "batched": {"kernel": bt, "bias": btb},
              "lhs": {"kernel": lhs}, "perm": {"kernel": perm}}
    # Columns: q 6 = 2 * 3 (flat over heads, head_dim), o 5, mid 8 = 2 * 4, batched 3 per slice,
    # lhs 4, perm 6 = 3 * 2.
    columns = {"q": {"kernel": np.array([1, 4, 5])}, "o": {"kernel": np.array([0, 3])},
               "mid": {"kernel": np.array([2, 5, 7])},
               "batched": {"kernel": np.array([[0, 2], [1, 2]])},
               "lhs": {"kernel": np.array([3])}, "perm": {"kernel": np.array([0, 1, 4])}}
    return _layouts_apply, params, (x,), jpeft.probe(_layouts_apply, params, x), columns


@pytest.fixture(scope="module")
def stacked():
    w, b, head, x = _normal(1, (3, 6, 6), (3, 6), (6, 2), (2, 3, 6))
    params = {"layers": {"kernel": w, "bias": b}, "head": {"kernel": head}}
    columns = {"layers": {"kernel": np.array([[0, 4], [1, 2], [3, 5]])}}   # its own per layer
    return _scan_apply, params, (x,), jpeft.probe(_scan_apply, params, x), columns


def _slices(w, layout):
    """``(stack index, index tuple of the weight without its free axes set)`` per stack slice."""
    stack = sorted(layout.stack)
    for s in np.ndindex(*[w.shape[a] for a in stack]):
        idx = [slice(None)] * w.ndim
        for a, v in zip(stack, s):
            idx[a] = v
        yield s, idx


def _column_index(idx, w, layout, col):
    """``idx`` with the free axes set to the (row-major) column ``col``."""
    free = sorted(layout.free)
    out = list(idx)
    for a, v in zip(free, np.unravel_index(col, [w.shape[a] for a in free])):
        out[a] = v
    return tuple(out)


def _numpy_edited(params, sites, columns, delta):
    """The base tree with ``W[s, I, col c[s, j]] += D[s, I, j]`` and ``b[s, col] += d[s, j]``, by
    loops over slices and kept columns (plain numpy)."""
    out = jax.tree.map(lambda a: np.array(a, np.float32), params)
    flat_d = paths.flatten(delta)
    for path, c in paths.flatten(columns).items():
        w, layout = paths.get_path(out, path), sites.contractions[path]
        bias_path = path[:-1] + ("bias",)
        b = paths.get_path(out, bias_path) if bias_path in flat_d else None
        d_w = np.asarray(flat_d[path])
        for s, idx in _slices(w, layout):
            for j, col in enumerate(c[s]):
                w[_column_index(idx, w, layout, col)] += d_w[s + (Ellipsis, j)]
                if b is not None:
                    o = np.unravel_index(col, [w.shape[a] for a in sorted(layout.free)])
                    b[s + o] += np.asarray(flat_d[bias_path])[s + (j,)]
    return out


def _edited_paths(method, params, delta, sites) -> set:
    """The weights that get a factored contraction edit (traced abstractly: no eager ops)."""
    got = set()
    jax.eval_shape(lambda p, d: got.update(
        method.edits(p, d, sites, jpeft.Context("factored")).contractions), params, delta)
    return got


def _far_outputs(apply, params, args, sites, method, delta):
    fact = jpeft.wrap(apply, method, sites)
    mat = jpeft.wrap(apply, method, sites, mode="materialised")
    return jax.jit(lambda p, d: (fact(p, d, *args), mat(p, d, *args),
                                 apply(method.merge(p, d, sites), *args)))(params, delta)


@pytest.mark.parametrize("model", ["layouts", "stacked"])
def test_any_layout_factored_materialised_merged_equal_the_numpy_edit(model, request):
    apply, params, args, sites, columns = request.getfixturevalue(model)
    method = far(columns)
    delta = _perturb(method.init(jax.random.key(0), params, sites), scale=0.5)
    flat_d, flat_c = paths.flatten(delta), paths.flatten(columns)
    # Shapes: D [*S, *I, k] and d [*S, k] where a bias [*S, *O] exists.
    for p, c in flat_c.items():
        lay, w = sites.contractions[p], paths.get_path(params, p)
        want = tuple(w.shape[a] for a in sorted(lay.stack) + sorted(lay.contract)) + (c.shape[-1],)
        assert flat_d[p].shape == want, paths.path_str(p)
    if model == "stacked":
        assert flat_d[("layers", "bias")].shape == (3, 2)                 # [L, k]
    else:
        assert flat_d[("q", "bias")].shape == (3,)                        # bias [2, 3] -> [k]
        assert flat_d[("batched", "bias")].shape == (2, 2)                # bias [2, 3] -> [S, k]
        assert ("mid", "bias") not in flat_d
    # Every kernel gets a factored edit (none is merged).
    assert _edited_paths(method, params, delta, sites) == set(flat_c)
    run = jax.jit(apply)
    want = run(_numpy_edited(params, sites, columns, delta), *args)
    fact, mat, merged = _far_outputs(apply, params, args, sites, method, delta)
    for got in (fact, mat, merged):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5), got, want)
    # Every output moved, and the unmerge restores the base weights.
    for a, b in zip(jax.tree.leaves(fact), jax.tree.leaves(run(params, *args))):
        assert not np.allclose(a, b, atol=1e-3)
    back = jax.jit(lambda p, d: method.unmerge(method.merge(p, d, sites), d, sites))(params, delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, params)


@pytest.mark.parametrize("model", ["layouts", "stacked"])
def test_any_layout_zero_delta_is_the_base_and_gradients_are_the_kept_columns(model, request):
    apply, params, args, sites, columns = request.getfixturevalue(model)
    method = far(columns)
    zero = method.init(jax.random.key(0), params, sites)
    modes = ("factored", "materialised")

    @jax.jit
    def zero_outputs(p, d):
        return (apply(p, *args), [jpeft.wrap(apply, method, sites, mode=m)(p, d, *args)
                                  for m in modes], method.merge(p, d, sites))
    base, outs, merged = zero_outputs(params, zero)
    for out in outs:
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     out, base)
    jax.tree.map(np.testing.assert_array_equal, merged, params)

    delta = _perturb(zero, scale=0.3)
    loss = lambda out: sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out))

    @jax.jit
    def grads(p, d, edited):        # reference: the plain gradient at the hand-edited weights
        full = jax.grad(lambda q: loss(apply(q, *args)))(edited)
        return full, [jax.grad(lambda dd, m=m: loss(jpeft.wrap(apply, method, sites, mode=m)(
            p, dd, *args)))(d) for m in modes]
    full, per_mode = grads(params, delta, _numpy_edited(params, sites, columns, delta))
    full = {p: np.asarray(v) for p, v in paths.flatten(full).items()}
    for g in per_mode:
        assert jax.tree.structure(g) == jax.tree.structure(delta)      # the delta, nothing else
        g = paths.flatten(g)
        for p, c in paths.flatten(columns).items():
            lay, gw = sites.contractions[p], full[p]
            want_w = np.zeros(g[p].shape, np.float32)
            bias_path = p[:-1] + ("bias",)
            want_b = np.zeros(g[bias_path].shape, np.float32) if bias_path in g else None
            for s, idx in _slices(gw, lay):
                for j, col in enumerate(c[s]):
                    want_w[s + (Ellipsis, j)] = gw[_column_index(idx, gw, lay, col)]
                    if want_b is not None:
                        o = np.unravel_index(col, [gw.shape[a] for a in sorted(lay.free)])
                        want_b[s + (j,)] = full[bias_path][s + o]
            np.testing.assert_allclose(g[p], want_w, atol=1e-4, rtol=1e-4)
            if want_b is not None:
                np.testing.assert_allclose(g[bias_path], want_b, atol=1e-4, rtol=1e-4)


def test_any_layout_scores_selection_and_report(layouts, stacked):
    for apply, params, args, sites, _ in (layouts, stacked):
        targets = [paths.path_str(p[:-1]) for p in sites.contractions if p[0] != "head"]
        scores = paths.flatten(far_magnitude_scores(params, targets, sites=sites))
        warm = _perturb(params, scale=0.2)
        change = paths.flatten(far_scores(params, warm, targets, sites=sites, normalize=True))
        flat, flat_w = paths.flatten(params), paths.flatten(warm)
        assert set(scores) == {p for p in sites.contractions if p[0] != "head"}
        for p, s in scores.items():
            lay, w = sites.contractions[p], flat[p]
            dw = np.asarray(flat_w[p], np.float64) - w
            bias = flat.get(p[:-1] + ("bias",))
            n_out = int(np.prod([w.shape[a] for a in lay.free]))
            want = np.zeros(tuple(w.shape[a] for a in sorted(lay.stack)) + (n_out,))
            want_change = np.zeros_like(want)
            entries = int(np.prod([w.shape[a] for a in lay.contract])) + (bias is not None)
            for st, idx in _slices(w, lay):
                for col in range(n_out):
                    ix = _column_index(idx, w, lay, col)
                    want[st + (col,)] = np.abs(w[ix]).sum()
                    want_change[st + (col,)] = np.abs(dw[ix]).sum()
                    if bias is not None:
                        o = np.unravel_index(col, [w.shape[a] for a in sorted(lay.free)])
                        db = np.asarray(flat_w[p[:-1] + ("bias",)], np.float64) - bias
                        want[st + (col,)] += abs(bias[st + o])
                        want_change[st + (col,)] += abs(db[st + o])
            np.testing.assert_allclose(s, want, rtol=1e-5)
            np.testing.assert_allclose(change[p], want_change / entries, rtol=1e-5)
        # Per slice: k = round(0.5 * n) of each row, its top scores, sorted.
        cols = paths.flatten(far_select(paths.unflatten(scores), 0.5))
        for p, c in cols.items():
            s = np.asarray(scores[p])
            assert c.shape == s.shape[:-1] + (kept_count(0.5, s.shape[-1]),)
            for row, srow in zip(c.reshape(-1, c.shape[-1]), s.reshape(-1, s.shape[-1])):
                assert np.all(np.diff(row) > 0)
                assert srow[row].min() >= np.delete(srow, row).max()
        delta = far(paths.unflatten(cols)).init(jax.random.key(0), params, sites)
        rep = far_report(params, paths.unflatten(cols), sites=sites)
        assert rep.trainable == jpeft.num_params(delta)
        assert rep.matrices == sum(int(np.prod(np.shape(c)[:-1])) for c in cols.values())
    # The stacked kernel keeps its own columns in each of its 3 layers.
    _, params, _, sites, _ = stacked
    rep = far_report(params, stacked[4], sites=sites)
    assert (rep.matrices, rep.columns_kept, rep.columns_total) == (3, 6, 18)
    assert rep.trainable == 3 * 2 * (6 + 1)


def test_stacked_shardings_and_stored_form(stacked, layouts, mesh, tmp_path):
    apply, params, args, sites, columns = stacked
    method = far(columns)
    specs = {("layers", "kernel"): P("data", "model", None), ("layers", "bias"): P("data", None)}
    shard = paths.unflatten({p: NamedSharding(mesh, specs.get(p, P()))
                             for p in paths.flatten(params)})
    delta = jax.eval_shape(lambda k: method.init(k, params, sites), jax.random.key(0))
    ds = jpeft.delta_shardings(method, shard, delta, sites)
    assert ds["layers"]["kernel"].spec == P("data", "model", None)      # D [L, in, k]
    assert ds["layers"]["bias"].spec == P("data", None)                 # d [L, k]
    _, lp, _, lsites, lcols = layouts
    lm = far(lcols)
    lspecs = {("o", "kernel"): P("model", None, None), ("mid", "kernel"): P("data", "model", None),
              ("batched", "kernel"): P("data", None, "model"), ("batched", "bias"): P("data")}
    lshard = paths.unflatten({p: NamedSharding(mesh, lspecs.get(p, P()))
                              for p in paths.flatten(lp)})
    lds = jpeft.delta_shardings(lm, lshard, jax.eval_shape(
        lambda k: lm.init(k, lp, lsites), jax.random.key(0)), lsites)
    assert lds["o"]["kernel"].spec == P("model", None, None)            # D [2, 3, k]
    assert lds["mid"]["kernel"].spec == P("model", None)                # D [5, k]: axis 1
    assert lds["batched"]["kernel"].spec == P("data", None, None)       # D [2, 4, k]
    assert lds["batched"]["bias"].spec == P("data", None)
    # Saved by name on the stacked layout: columns [3, k] per layer, D [3, 6, k], d [3, k].
    real = _perturb(method.init(jax.random.key(0), params, sites))
    assert real["layers"]["kernel"].shape == (3, 6, 2) and real["layers"]["bias"].shape == (3, 2)
    jpeft.save(tmp_path / "far", method, real)
    loaded = jpeft.load(tmp_path / "far", params, sites)
    np.testing.assert_array_equal(loaded.method.data["layers"]["kernel"],
                                  columns["layers"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, loaded.delta, real)
    np.testing.assert_array_equal(
        jpeft.wrap(apply, loaded.method, sites)(params, loaded.delta, *args),
        jpeft.wrap(apply, method, sites)(params, real, *args))


def _dot_output_shapes(jaxpr) -> list:
    """Output shapes of every ``dot_general`` in a jaxpr, sub-jaxprs (scan bodies) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(eqn.outvars[0].aval.shape))
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    out += _dot_output_shapes(sub.jaxpr)
                elif hasattr(sub, "eqns"):
                    out += _dot_output_shapes(sub)
    return out


def test_stacked_factored_step_never_forms_the_full_weight_gradient(stacked):
    apply, params, _, sites, _ = stacked
    args = (_normal(2, (1, 5, 6))[0],)          # 5 tokens: no [tokens, in] product is [6, 6]
    method = far({"layers": {"kernel": np.array([[0], [4], [2]])}})       # k = 1 of 6 per layer
    delta = method.init(jax.random.key(0), params, sites)
    flops, dots = {}, {}
    for mode in ("factored", "materialised"):
        f = jpeft.wrap(apply, method, sites, mode=mode)
        g = jax.grad(lambda d, p: jnp.sum(f(p, d, *args) ** 2))
        cost = jax.jit(g).lower(delta, params).cost_analysis()
        flops[mode] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
        dots[mode] = _dot_output_shapes(jax.make_jaxpr(g)(delta, params).jaxpr)
    # The materialised step forms each layer's [6, 6] gradient x^T dy; the factored one only its
    # kept column ([6, 1]), under the scan that slices D and the columns per layer.
    assert (6, 6) in dots["materialised"] and (6, 6) not in dots["factored"], dots
    assert {(6, 1), (1, 6)} & set(dots["factored"])            # dD, in either orientation
    assert flops["factored"] < flops["materialised"], flops


def test_any_layout_errors(layouts, stacked):
    apply, params, args, sites, columns = layouts
    with pytest.raises(ValueError, match=r"column 6 is out of range for q/kernel with 6 columns"):
        far({"q": {"kernel": np.array([0, 6])}}).init(jax.random.key(0), params, sites)
    with pytest.raises(ValueError, match=r"column 8 is out of range for mid/kernel with 8 columns"):
        far({"mid": {"kernel": np.array([8])}}).init(jax.random.key(0), params, sites)
    with pytest.raises(ValueError, match=r"q/kernel has shape \(6, 2, 3\), not a matrix .*sites"):
        far({"q": {"kernel": np.array([0])}}).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"q/kernel has shape \(6, 2, 3\), not a matrix"):
        far_report(params, {"q": {"kernel": np.array([0])}})
    with pytest.raises(ValueError, match="sorted and distinct"):
        far({"batched": {"kernel": np.array([[0, 2], [2, 1]])}})
    with pytest.raises(ValueError, match="global.*stacked"):
        far_select({"batched": {"kernel": np.ones((2, 3))}}, 0.5, budget="global")
    _, sp, _, ssites, _ = stacked
    with pytest.raises(ValueError, match=r"have shape \(2,\).*stack axes \[0\] of sizes \[3\]"):
        far({"layers": {"kernel": np.array([0, 1])}}).init(jax.random.key(0), sp, ssites)
    with pytest.raises(ValueError, match="layers_to_transform .* stacked"):
        far_magnitude_scores(sp, ["layers"], sites=ssites, layers_to_transform=0)
    bad = jax.tree.map(lambda a: a, sp)
    bad["layers"] = {**sp["layers"], "bias": np.zeros((6,), np.float32)}
    with pytest.raises(ValueError, match=r"bias layers/bias has shape \(6,\).*\[\*S, \*O\] = \(3, 6\)"):
        far({"layers": {"kernel": np.array([[0]] * 3)}}).init(jax.random.key(0), bad, ssites)

    # A weight also used outside contractions has no factored form; the materialised one works.
    def tied(p, x):
        return jnp.einsum("btd,dnh->btnh", x, p["q"]["kernel"]) + jnp.sum(p["q"]["kernel"])
    tp = {"q": {"kernel": params["q"]["kernel"]}}
    tsites = jpeft.probe(tied, tp, *args)
    method = far({"q": {"kernel": np.array([1, 2])}})
    delta = _perturb(method.init(jax.random.key(0), tp, tsites))
    with pytest.raises(ValueError, match=r"q/kernel is also used outside contractions .*reduce_sum.*materialised"):
        jpeft.wrap(tied, method, tsites)(tp, delta, *args)
    np.testing.assert_allclose(jpeft.wrap(tied, method, tsites, mode="materialised")(tp, delta, *args),
                               tied(_numpy_edited(tp, tsites, {"q": {"kernel": np.array([1, 2])}},
                                                  delta), *args), atol=1e-4)
