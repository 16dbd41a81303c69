"""FAR against the math: column scores and selection, exact densities, W0 + scatter_c(D), factored ==
merged == materialised, gradients only for the kept columns, cost, sharding, stored form, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jpeft
from jpeft.core import paths
from jpeft.methods.far import (BERT_FFN, far, far_magnitude_scores, far_pack,
                               far_report, far_scores, far_select, far_stored_like, far_unpack,
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


def _grad_flops(model, variables, method, delta, batch, mode, sites):
    f = jpeft.wrap(model.apply, method, sites, mode=mode)
    g = jax.jit(jax.grad(lambda d, p: jnp.sum(f(p, d, **batch) ** 2)))
    cost = g.lower(delta, variables).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return cost["flops"]


def test_factored_form_never_forms_the_full_weight_gradient(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    columns = far_select(far_magnitude_scores(variables), 0.125)
    method = far(columns)
    delta = method.init(jax.random.key(0), variables)
    fact = _grad_flops(model, variables, method, delta, tiny_batch, "factored", tiny_sites)
    mat = _grad_flops(model, variables, method, delta, tiny_batch, "materialised", tiny_sites)
    # Materialised forms, per FFN matrix [in, out], the gradient x^T dy (2 N in out FLOPs for N
    # tokens) and keeps k columns; the factored form forms only x^T dy[:, c] (2 N in k) and pays
    # x @ D forward and dy[:, c] @ D^T backward (2 N in k each).
    n = int(np.prod(tiny_batch["input_ids"].shape))
    flat, cols = paths.flatten(variables), paths.flatten(columns)
    full_grad = sum(2 * n * flat[p].shape[0] * flat[p].shape[1] for p in cols)
    kept_grad = sum(2 * n * flat[p].shape[0] * c.size for p, c in cols.items())
    assert mat - fact >= full_grad - 3 * kept_grad > 0, (fact, mat, full_grad, kept_grad)


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


def test_stored_form_round_trips_through_the_checkpoint(setup, tmp_path):
    model, variables, columns, method, delta, batch, sites = setup
    delta = _perturb(delta)
    stored = far_pack(columns, delta)
    layer = stored["params"]["bert"]["encoder"]["layer"]["1"]["output"]["dense"]
    assert set(layer) == {"indices", "kernel_cols", "bias_cols"}
    assert layer["indices"].dtype == np.int32 and layer["kernel_cols"].shape == (64, 8)
    # The template from the indices and the one read from the checkpoint agree.
    like = far_stored_like(variables, columns)
    jpeft.checkpoint.save(tmp_path / "far", stored)
    from_disk = jpeft.checkpoint.stored_like(tmp_path / "far")
    assert jax.tree.map(lambda s: (s.shape, s.dtype), from_disk) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), like)
    restored = jpeft.checkpoint.restore(tmp_path / "far", from_disk)["delta"]
    cols2, delta2 = far_unpack(restored)
    for a, b in zip(jax.tree.leaves(cols2), jax.tree.leaves(columns)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(delta2), jax.tree.leaves(delta)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(delta2) == jax.tree.structure(delta)
    out = jax.jit(jpeft.wrap(model.apply, far(cols2), sites))(variables, delta2, **batch)
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
    with pytest.raises(ValueError, match="not a FAR stored form"):
        far_unpack({"params": {"dense": {"kernel": np.ones((2, 2))}}})
    with pytest.raises(ValueError, match="holds 8 columns but 2 indices"):
        far_pack(paths.unflatten({k: np.array([0, 1])}),
                 paths.unflatten({k: np.zeros((64, 8))}))
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
