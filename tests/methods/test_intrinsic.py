"""DID / SAID: the Fastfood projection against a dense reference, its normalisation, the budget,
training, exact checkpoints, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jpeft
from jpeft import checkpoint
from jpeft.core import paths
from jpeft.methods import intrinsic
from jpeft.ops import permutation


def _dense_h(n: int) -> np.ndarray:
    """``H[i, j] = (-1)^popcount(i & j)``, built here from the definition."""
    i = np.arange(n)
    bits = i[:, None] & i[None, :]
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return 1.0 - 2.0 * parity


_factors = jax.jit(intrinsic.fastfood_factors, static_argnums=(1, 2))
_perm = jax.jit(permutation.feistel_indices, static_argnums=1)


def _reference(theta: np.ndarray, size: int, key) -> np.ndarray:
    """METHODS.md / the paper, with dense matrices in float64:
    ``(H G Pi H B x)[:D] / (sqrt(LL sum G^2) sqrt(D / LL))``, ``x`` = theta zero-padded to LL."""
    d = theta.shape[0]
    f = _factors(key, d, size)
    ll = 1 << int(np.ceil(np.log2(max(d, size))))
    assert int(f.ll) == ll
    h = _dense_h(ll)
    b = np.zeros(ll)
    b[:d] = np.asarray(f.signs)
    assert set(np.unique(b[:d])) <= {-1.0, 1.0}
    pi = np.eye(ll)[np.asarray(_perm(f.perm_keys, ll))]       # (Pi v)[k] = v[perm[k]]
    g = np.asarray(f.gauss, np.float64)
    x = np.zeros(ll)
    x[:d] = theta
    full = h @ np.diag(g) @ pi @ h @ (b * x)
    return full[:size] / (np.sqrt(ll * np.sum(g ** 2)) * np.sqrt(size / ll))


@pytest.mark.parametrize("d,size", [(1, 1), (1, 7), (3, 5), (10, 100), (64, 64), (37, 513),
                                    (100, 3), (500, 20)])
def test_projection_equals_dense_fastfood(d, size):
    key = jax.random.key(d * 1000 + size)
    theta = np.random.default_rng(d).normal(size=d).astype(np.float32)
    got = intrinsic.fastfood(theta, size, key)
    want = _reference(theta.astype(np.float64), size, key)
    assert got.shape == (size,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_projection_of_zero_is_zero_and_projection_is_linear():
    key = jax.random.key(0)
    assert not np.any(np.asarray(intrinsic.fastfood(jnp.zeros(50), 300, key)))
    x, y = jax.random.normal(jax.random.key(1), (2, 50))
    lhs = intrinsic.fastfood(2.0 * x - 3.0 * y, 300, key)
    rhs = 2.0 * intrinsic.fastfood(x, 300, key) - 3.0 * intrinsic.fastfood(y, 300, key)
    np.testing.assert_allclose(lhs, rhs, atol=1e-5)


def _columns(d: int, size: int, seeds: int) -> np.ndarray:
    """``[seeds, d]`` squared norms of the columns ``P e_j``."""
    cols = jax.vmap(jax.vmap(lambda e, k: intrinsic.fastfood(e, size, k), (0, None)), (None, 0))
    keys = jax.random.split(jax.random.key(size), seeds)
    p = jax.jit(cols)(jnp.eye(d), keys)                                    # [seeds, d, size]
    return np.asarray(jnp.sum(p ** 2, axis=-1), np.float64)


def test_columns_have_unit_norm_exactly_when_the_tensor_fills_ll():
    """D = LL: the map is a scaled orthogonal-times-diagonal chain; every column norm is 1."""
    np.testing.assert_allclose(_columns(16, 256, 4), 1.0, rtol=2e-5)


@pytest.mark.parametrize("d,size", [(32, 300), (600, 100)])
def test_columns_have_unit_norm_in_expectation(d, size):
    """D < LL: E ||P e_j||^2 = 1 (the sqrt(D / LL) rescaling); without it the mean would be D / LL."""
    sq = _columns(d, size, 48)
    per_seed = sq.mean(axis=1)                                             # independent samples
    se = per_seed.std(ddof=1) / np.sqrt(per_seed.size)
    ll = 1 << int(np.ceil(np.log2(max(d, size))))
    assert abs(per_seed.mean() - 1.0) < 5 * se, (per_seed.mean(), se)
    assert abs(per_seed.mean() - size / ll) > 20 * se                       # the factor matters
    assert 0.3 < sq.min() and sq.max() < 3.0


def test_batched_projection_equals_single():
    theta = jax.random.normal(jax.random.key(0), (40,))
    sizes = [7, 300, 300, 1, 200]
    keys = intrinsic.tensor_keys(3, [("t", str(i)) for i in range(len(sizes))])
    many = intrinsic.fastfood_many(theta, sizes, keys)
    for i, size in enumerate(sizes):
        want = _reference(np.asarray(theta, np.float64), size, keys[i])
        np.testing.assert_allclose(many[i], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --------------------------------------------------------------------------------------------
# The methods, on a small two-layer model written as a plain pytree (jpeft is generic over key
# paths): every test compiles projections, and this keeps them few. The real model: MiniLM below.


def _mlp_variables():
    k = jax.random.split(jax.random.key(0), 6)
    layer = lambda a, b: {"dense": {"kernel": 0.3 * jax.random.normal(a, (8, 8)),
                                    "bias": 0.1 * jax.random.normal(b, (8,))}}
    return {"params": {"embed": {"embedding": jax.random.normal(k[0], (12, 8))},
                       "layer": {"0": layer(k[1], k[2]), "1": layer(k[3], k[4])},
                       "classifier": {"kernel": 0.3 * jax.random.normal(k[5], (8, 2)),
                                      "bias": jnp.zeros(2)}}}


def _mlp_apply(variables, ids):
    p = variables["params"]
    h = p["embed"]["embedding"][ids].mean(axis=1)
    for i in ("0", "1"):
        h = jnp.tanh(h @ p["layer"][i]["dense"]["kernel"] + p["layer"][i]["dense"]["bias"])
    return h @ p["classifier"]["kernel"] + p["classifier"]["bias"]


MLP_IDS = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 0]], np.int32)
MLP_LABELS = np.array([0, 1, 1, 0], np.int32)


def _loss(apply, method):
    f = jpeft.wrap(apply, method)

    def loss(params, delta, batch, key):
        del key
        logits = f(params, delta, *batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss


@pytest.fixture(scope="module")
def mlp():
    return _mlp_variables()


def test_zero_delta_is_exactly_the_base_model(mlp):
    method = intrinsic.did(20)
    jax.tree.map(np.testing.assert_array_equal,
                 jax.jit(method.merge)(mlp, method.init(jax.random.key(0), mlp)), mlp)
    method = intrinsic.said(20)
    # Op by op (not jitted: two different compiled programs may round differently in the last
    # bit), the forward pass with a zero delta is the base model's, bit for bit.
    out = jpeft.wrap(_mlp_apply, method)(mlp, method.init(jax.random.key(0), mlp), MLP_IDS)
    np.testing.assert_array_equal(out, _mlp_apply(mlp, MLP_IDS))
    assert jax.tree.map(jnp.shape, intrinsic.did(20).init(None, mlp)) == {"theta_d": (20,)}


def test_merge_adds_each_tensors_projection_at_its_path(mlp):
    method = intrinsic.did(20, seed=5, exclude=("classifier",))
    theta = jax.random.normal(jax.random.key(1), (20,))
    merged_tree = jax.jit(method.merge)(mlp, {"theta_d": theta})
    merged = paths.flatten(merged_tree)
    base = paths.flatten(mlp)
    project = jax.jit(intrinsic.fastfood, static_argnums=1)
    projected = 0
    for p, w in base.items():
        if p[1] == "classifier":
            np.testing.assert_array_equal(merged[p], w)
            continue
        inc = project(theta, w.size, intrinsic.tensor_key(5, p)).reshape(w.shape)
        np.testing.assert_allclose(merged[p] - w, inc, atol=1e-5)
        assert np.abs(inc).max() > 0
        projected += 1
    assert projected == len(base) - 2                 # everything but the head's kernel and bias
    back = jax.jit(method.unmerge)(merged_tree, {"theta_d": theta})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, mlp)


def test_d_equal_1_trains_one_number(mlp):
    method = intrinsic.did(1)
    delta = method.init(jax.random.key(0), mlp)
    assert jpeft.num_params(delta) == 1
    batch = {"inputs": (MLP_IDS,), "labels": MLP_LABELS}
    loss = jax.jit(_loss(_mlp_apply, method))
    opt = optax.adam(0.5)
    step = jpeft.make_train_step(loss, opt, donate=False)
    before = jax.tree.map(np.array, mlp)
    l0 = float(loss(mlp, delta, batch, None))
    new, _, metrics = step(mlp, delta, opt.init(delta), batch, jax.random.key(0))
    assert float(metrics["loss"]) == pytest.approx(l0)
    assert new["theta_d"].shape == (1,) and abs(float(new["theta_d"][0])) == pytest.approx(0.5, rel=1e-4)
    assert abs(float(loss(mlp, new, batch, None)) - l0) > 1e-4          # the loss moved
    jax.tree.map(np.testing.assert_array_equal, mlp, before)            # the base stays frozen
    merged = paths.flatten(jax.jit(method.merge)(mlp, new))
    base = paths.flatten(mlp)
    assert all(not np.array_equal(merged[p], base[p]) for p in base)    # every tensor moved


def test_said_scalars_are_counted_inside_d(mlp):
    flat = paths.flatten(mlp)
    layers = sorted({paths.layer_index(p[:-1]) for p in flat} - {None})
    other = [p for p in flat if paths.layer_index(p[:-1]) is None]
    assert layers == [0, 1] and len(other) == 3
    m = len(layers) + 1                  # the tensors without a layer index share one more scalar
    delta = intrinsic.said(50).init(jax.random.key(0), mlp)
    assert delta["lambda"].shape == (m,) and delta["theta_d"].shape == (50 - m,)
    assert jpeft.num_params(delta) == 50
    np.testing.assert_array_equal(delta["lambda"], 1.0)
    np.testing.assert_array_equal(delta["theta_d"], 0.0)
    per_tensor = intrinsic.said(50, groups="tensor").init(jax.random.key(0), mlp)
    assert per_tensor["lambda"].shape == (len(flat),) and jpeft.num_params(per_tensor) == 50
    custom = intrinsic.said(50, groups=lambda p: p[1]).init(jax.random.key(0), mlp)
    assert custom["lambda"].shape == (3,)            # embed, layer, classifier
    with pytest.raises(ValueError, match=f"d = {m} must be larger than the number of SAID "
                                         f"scalars m = {m}"):
        intrinsic.said(m).init(jax.random.key(0), mlp)
    assert intrinsic.said(m + 1).init(jax.random.key(0), mlp)["theta_d"].shape == (1,)


def test_said_lambda_scales_each_layer(mlp):
    method = intrinsic.said(40, seed=2)
    p = intrinsic.plan(mlp, paths.Selection(), said=True)
    assert p.group_names[:2] == ("layer 0", "layer 1")
    m = len(p.group_names)
    theta = jax.random.normal(jax.random.key(3), (40 - m,))
    merge = jax.jit(method.merge)
    lam = jnp.ones(m).at[0].set(0.0).at[1].set(2.0)
    merged = paths.flatten(merge(mlp, {"theta_d": theta, "lambda": lam}))
    ones = paths.flatten(merge(mlp, {"theta_d": theta, "lambda": jnp.ones(m)}))
    base = paths.flatten(mlp)
    for path in base:
        layer = paths.layer_index(path[:-1])
        if layer == 0:
            np.testing.assert_array_equal(merged[path], base[path])
        elif layer == 1:
            np.testing.assert_allclose(merged[path] - base[path], 2 * (ones[path] - base[path]),
                                       atol=1e-5)
        else:
            np.testing.assert_array_equal(merged[path], ones[path])


def test_said_trains_from_its_initialisation(mlp):
    method = intrinsic.said(60)
    delta = method.init(jax.random.key(0), mlp)
    batch = {"inputs": (MLP_IDS,), "labels": MLP_LABELS}
    grads = jax.jit(jax.grad(lambda d: _loss(_mlp_apply, method)(mlp, d, batch, None)))(delta)
    assert np.abs(np.asarray(grads["theta_d"])).max() > 0          # lambda = 1 lets theta move
    np.testing.assert_array_equal(grads["lambda"], 0.0)            # P(0) = 0 at the start


def test_seed_fixes_the_projection(mlp):
    """(That the same seed gives the same projection bit for bit: the checkpoint test.)"""
    theta = {"theta_d": jnp.linspace(-1.0, 1.0, 30)}
    a, b = (paths.flatten(jax.jit(intrinsic.did(30, seed=s).merge)(mlp, theta)) for s in (0, 1))
    for p in a:
        assert not np.allclose(a[p], b[p])


def test_a_tensors_projection_does_not_depend_on_the_rest_of_the_selection(mlp):
    theta = {"theta_d": jnp.linspace(-1.0, 1.0, 30)}
    every = paths.flatten(jax.jit(intrinsic.did(30).merge)(mlp, theta))
    one = paths.flatten(jax.jit(intrinsic.did(30, targets=("layer/1/dense",)).merge)(mlp, theta))
    base = paths.flatten(mlp)
    for p in base:
        if p[2:4] == ("1", "dense"):
            np.testing.assert_allclose(one[p], every[p], atol=1e-6)
        else:
            np.testing.assert_array_equal(one[p], base[p])


def test_checkpoint_round_trip_reproduces_outputs_bit_for_bit(mlp, tmp_path):
    """Saved: theta_d, lambda and the config (d, seed, selection); the method rebuilt from the
    config alone reproduces the outputs bit for bit (the whole MiniLM: ``jpeft demo --method said``)."""
    method = intrinsic.said(64, seed=7, exclude=("classifier",))
    like = jax.eval_shape(method.init, jax.random.key(0), mlp)
    k1, k2 = jax.random.split(jax.random.key(1))
    delta = {"theta_d": jax.random.normal(k1, like["theta_d"].shape),     # a trained-looking delta
             "lambda": 1 + 0.1 * jax.random.normal(k2, like["lambda"].shape)}
    checkpoint.save(tmp_path / "ck", delta, metadata={"config": method.config})

    meta = checkpoint.metadata(tmp_path / "ck")["metadata"]["config"]
    assert meta["seed"] == 7 and meta["d"] == 64
    rebuilt = intrinsic.from_config(meta)               # the method from the saved config alone
    restored = checkpoint.restore(
        tmp_path / "ck", jax.eval_shape(rebuilt.init, jax.random.key(0), mlp))["delta"]
    out = jax.jit(jpeft.wrap(_mlp_apply, method))(mlp, delta, MLP_IDS)
    np.testing.assert_array_equal(jax.jit(jpeft.wrap(_mlp_apply, rebuilt))(mlp, restored, MLP_IDS),
                                  out)
    assert np.abs(out - _mlp_apply(mlp, MLP_IDS)).max() > 1e-3


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10", None])
def test_d_below_one_or_not_an_integer_is_a_clear_error(bad):
    for build in (intrinsic.did, intrinsic.said):
        with pytest.raises(ValueError, match="d must be a positive integer"):
            build(bad)


def test_other_bad_arguments(mlp):
    variables = mlp
    with pytest.raises(ValueError, match="groups"):
        intrinsic.said(10, groups="block")
    with pytest.raises(ValueError, match="max_block"):
        intrinsic.did(10, max_block=3)
    with pytest.raises(ValueError, match="did: targets"):
        intrinsic.did(10, targets=("dens",)).init(jax.random.key(0), variables)


def test_delta_is_replicated_over_the_mesh(mlp):
    variables = mlp
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    shards = jpeft.shard_by_rules(variables, mesh,
                                  [(r".*layer/.*/kernel", PartitionSpec(None, "model"))])
    method = intrinsic.said(40)
    delta = method.init(jax.random.key(0), variables)
    for s in jax.tree.leaves(method.shardings(shards, delta)):
        assert isinstance(s, NamedSharding) and s.spec == PartitionSpec() and s.mesh == mesh


@pytest.mark.slow
def test_whole_minilm(minilm):
    """All 101 tensors of MiniLM except the head (22.6M entries, the 11.7M-entry word embedding
    included) projected from d = 1000; one jitted merge."""
    variables = {"params": minilm.params}
    method = intrinsic.said(1000, exclude=("classifier",))
    delta = method.init(jax.random.key(0), variables)
    p = intrinsic.plan(variables, paths.Selection(exclude=("classifier",)), said=True)
    assert len(p.paths) == 101 and sum(p.sizes) == jpeft.num_params(variables) - 770
    assert p.group_names == tuple(f"layer {i}" for i in range(6)) + ("no layer index",)
    delta = {"theta_d": jnp.zeros(1000 - 7).at[0].set(1.0), "lambda": delta["lambda"]}
    merged = paths.flatten(jax.jit(method.merge)(variables, delta))
    base = paths.flatten(variables)
    for path, size in zip(p.paths, p.sizes):
        inc = np.asarray(merged[path], np.float64) - np.asarray(base[path], np.float64)
        # a unit theta_d moves each tensor by a norm of about 1 (E ||P e_0||^2 = 1)
        assert 0.5 < np.linalg.norm(inc) < 1.6, (path, np.linalg.norm(inc))
    head = [q for q in base if q[1] == "classifier"]
    for q in head:
        np.testing.assert_array_equal(merged[q], base[q])
