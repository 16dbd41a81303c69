"""Diff pruning against the paper's formulas (recomputed in numpy): layout, exact zero delta,
sampled versus deterministic gates, merge, the expected-L0 penalty, projection, re-fine-tune."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jpeft
from jpeft.core import paths, sparse
from jpeft.core.method import Context
from jpeft.methods import diff_pruning as dp


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _det_gate(alpha, l=-1.5, r=1.5):
    return np.clip(_sigmoid(alpha) * (r - l) + l, 0.0, 1.0)


class _Small(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(11, 6, name="embed")(ids)
        h = nn.LayerNorm(name="norm")(jnp.tanh(nn.Dense(7, name="dense")(h)))
        return nn.Dense(3, name="classifier")(h.mean(1))


@pytest.fixture(scope="module")
def small():
    model = _Small()
    ids = np.array([[1, 4, 9], [3, 3, 0], [7, 2, 5], [10, 1, 1]], np.int32)
    return model, model.init(jax.random.key(0), ids), ids


def _randomise(delta, seed=0, w_scale=0.3):
    """Random w, and alpha spread so that deterministic gates are 0, in (0, 1) and 1."""
    rng = np.random.default_rng(seed)

    def one(kp, x):
        name = paths.to_path(kp)[-1]
        if name == "w":
            return jnp.asarray(w_scale * rng.standard_normal(x.shape), x.dtype)
        return jnp.asarray(rng.uniform(-4.0, 4.0, x.shape), x.dtype)
    return jax.tree_util.tree_map_with_path(one, delta)


def test_delta_layout_and_counts(tiny_bert):
    variables = {"params": tiny_bert[1]}
    head = jpeft.num_params(variables["params"]["classifier"])
    n = jpeft.num_params(variables) - head
    n_tensors = len(paths.flatten(variables)) - 2
    for structured in (False, True):
        method = dp.diff_pruning(exclude=("classifier",), structured=structured)
        delta = method.init(jax.random.key(0), variables)
        assert "classifier" not in delta["params"]
        assert jpeft.num_params(delta) == 2 * n + (n_tensors if structured else 0)
        flat = paths.flatten(delta)
        assert all(np.all(np.asarray(x) == 0) for p, x in flat.items() if p[-1] == "w")
        assert all(np.all(np.asarray(x) == 5.0) and x.dtype == jnp.float32
                   for p, x in flat.items() if p[-1] in ("alpha", "alpha_group"))
        assert all(x.shape == () for p, x in flat.items() if p[-1] == "alpha_group")
        kinds = set(jax.tree.leaves(dp.labels(delta)))
        assert kinds == {"w", "alpha"}
        # alpha_init = 5: every deterministic gate is open, and P(z != 0) = sigmoid(5) per gate
        # (structured: the group gate's probability times the entry gate's).
        assert np.all(np.concatenate([np.ravel(z) for z in jax.tree.leaves(jax.jit(dp.gates)(delta))]) == 1)
        p_open = _sigmoid(5.0) ** (2 if structured else 1)
        assert float(dp.expected_l0(delta)) == pytest.approx(p_open * n, rel=1e-5)


def test_zero_delta_is_exactly_the_base_model(small):
    model, variables, ids = small
    method = dp.diff_pruning(structured=True)
    zero = method.init(jax.random.key(0), variables)
    prepare = jax.jit(lambda p, d, k: (lambda e: (e.params, e.contractions))(
        method.edits(p, d, None, Context(rng=k))))
    apply = jax.jit(model.apply)
    base = np.asarray(apply(variables, ids))
    # Training (sampled gates) and evaluation (deterministic gates): the forward pass runs with
    # parameters bit for bit equal to the base, so its outputs are the base model's.
    for key in (jax.random.key(1), None):
        prepared, contractions = prepare(variables, zero, key)
        assert contractions == {}
        jax.tree.map(np.testing.assert_array_equal, prepared, variables)
        np.testing.assert_array_equal(np.asarray(apply(prepared, ids)), base)


def test_merge_equals_the_unmerged_forward_and_the_numpy_formula(tiny_bert, tiny_batch):
    model, params = tiny_bert
    variables = {"params": params}
    for structured in (False, True):
        method = dp.diff_pruning(exclude=("classifier",), structured=structured)
        delta = _randomise(method.init(jax.random.key(0), variables))
        merged = jax.jit(method.merge)(variables, delta)
        flat_m, flat_d = paths.flatten(merged), paths.flatten(delta)
        zs = []
        for p, w0 in paths.flatten(variables).items():
            if p + ("w",) not in flat_d:
                np.testing.assert_array_equal(flat_m[p], w0)
                continue
            z = _det_gate(flat_d[p + ("alpha",)])
            if structured:
                z = z * _det_gate(flat_d[p + ("alpha_group",)])
            zs.append(z.ravel())
            want = np.asarray(w0, np.float64) + z * np.asarray(flat_d[p + ("w",)], np.float64)
            np.testing.assert_allclose(flat_m[p], want, atol=1e-6, rtol=0)
        zs = np.concatenate(zs)
        assert (zs == 0).any() and (zs == 1).any() and ((zs > 0) & (zs < 1)).any()
    # The unmerged forward pass (evaluation: deterministic gates) equals the merged model.
    apply = jax.jit(model.apply)
    f = jax.jit(lambda p, d: jpeft.wrap(model.apply, method)(p, d, **tiny_batch))
    out = np.asarray(f(variables, delta))
    np.testing.assert_allclose(out, np.asarray(apply(merged, **tiny_batch)), atol=1e-6)
    assert not np.allclose(out, np.asarray(apply(variables, **tiny_batch)), atol=1e-3)
    back = jax.jit(method.unmerge)(merged, delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), back, variables)


def test_training_samples_gates_and_evaluation_does_not(small):
    _, variables, _ = small
    method = dp.diff_pruning(structured=False)
    delta = _randomise(method.init(jax.random.key(0), variables), w_scale=1.0)
    prep = jax.jit(lambda d, k: method.edits(variables, d, None, Context(rng=k)).params)
    flat_w0, flat_d = paths.flatten(variables), paths.flatten(delta)
    a, a2, b = (paths.flatten(prep(delta, k)) for k in
                (jax.random.key(1), jax.random.key(1), jax.random.key(2)))
    ratios = []
    for p in flat_w0:
        w = np.asarray(flat_d[p + ("w",)], np.float64)
        np.testing.assert_array_equal(a[p], a2[p])                  # same key, same gates
        ratios.append(((np.asarray(a[p], np.float64) - np.asarray(flat_w0[p], np.float64)) / w).ravel())
    ratios = np.concatenate(ratios)                                 # the sampled gates z
    assert ratios.min() > -1e-5 and ratios.max() < 1 + 1e-5
    assert any(not np.array_equal(a[p], b[p]) for p in a)           # another key, other gates
    evaluation = paths.flatten(method.edits(variables, delta, None, Context()).params)
    merged = paths.flatten(method.merge(variables, delta))
    for p in evaluation:
        np.testing.assert_array_equal(evaluation[p], merged[p])
    # Hard gates: alpha = +60 opens every gate, -60 closes every gate, in training too.
    for value, gate in ((60.0, 1.0), (-60.0, 0.0)):
        d = jax.tree_util.tree_map_with_path(
            lambda kp, x: jnp.full_like(x, value) if paths.to_path(kp)[-1] == "alpha" else x, delta)
        got = paths.flatten(prep(d, jax.random.key(4)))
        for p, w0 in flat_w0.items():
            np.testing.assert_allclose(got[p], np.asarray(w0) + gate * np.asarray(flat_d[p + ("w",)]),
                                       atol=1e-6)


@pytest.mark.parametrize("l, r", [(-1.5, 1.5), (-0.1, 1.1)])
def test_l0_penalty_and_its_gradient_match_numpy(small, l, r):
    _, variables, _ = small
    lam = 1.25e-7
    for structured in (False, True):
        delta = _randomise(dp.diff_pruning(structured=structured, l=l, r=r).init(None, variables))
        flat = paths.flatten(delta)
        shift = math.log(-l / r)
        want, grads = 0.0, {}
        for p in {p[:-1] for p in flat}:
            pe = _sigmoid(np.asarray(flat[p + ("alpha",)], np.float64) - shift)
            pg = _sigmoid(np.asarray(flat[p + ("alpha_group",)]) - shift) if structured else 1.0
            want += pg * pe.sum()
            grads[p + ("alpha",)] = lam * pg * pe * (1 - pe)
            if structured:
                grads[p + ("alpha_group",)] = lam * pe.sum() * pg * (1 - pg)
        got = float(dp.l0_penalty(delta, lam, l=l, r=r))
        assert got == pytest.approx(lam * want, rel=1e-5)
        assert float(dp.expected_l0(delta, l=l, r=r)) == pytest.approx(want, rel=1e-5)
        g = paths.flatten(jax.grad(lambda d: dp.l0_penalty(d, lam, l=l, r=r))(delta))
        for p, x in g.items():
            if p[-1] == "w":
                assert np.all(np.asarray(x) == 0)
            else:
                np.testing.assert_allclose(x, grads[p], rtol=1e-4, atol=1e-14)


def test_project_keeps_exactly_the_largest_differences(small):
    _, variables, _ = small
    method = dp.diff_pruning(exclude=("classifier",), structured=True)
    delta = _randomise(method.init(jax.random.key(0), variables))
    flat = paths.flatten(delta)
    bases = sorted({p[:-1] for p in flat})
    # Reference in numpy (float64): z * w with deterministic gates.
    diffs = [(_det_gate(flat[p + ("alpha",)]) * _det_gate(flat[p + ("alpha_group",)])
              * np.asarray(flat[p + ("w",)], np.float64)).ravel() for p in bases]
    got_d = paths.flatten(jax.jit(dp.differences)(delta))
    for p, d in zip(bases, diffs):
        np.testing.assert_allclose(np.ravel(got_d[p]), d, atol=1e-6)
    ref = np.abs(np.concatenate(diffs))
    n = ref.size
    assert n == jpeft.num_params(variables) - jpeft.num_params(variables["params"]["classifier"])
    starts = np.cumsum([0] + [d.size for d in diffs])
    for density in (0.02, 0.1, 0.5):
        k = int(np.floor(density * n + 0.5))
        proj = dp.project(delta, density)
        assert sparse.num_entries(proj.indices) == k
        got_i, got_v = paths.flatten(proj.indices), paths.flatten(proj.values)
        kept = np.zeros(n, bool)
        for j, p in enumerate(bases):
            if p in got_i:
                kept[starts[j] + got_i[p]] = True
                np.testing.assert_array_equal(got_v[p], np.ravel(got_d[p])[got_i[p]])
        assert kept.sum() == k
        # Every kept |z * w| is at least every dropped one (up to float32 rounding).
        assert ref[kept].min() >= ref[~kept].max() - 1e-6
    assert sparse.num_entries(dp.project(delta, k=7).indices) == 7
    for bad in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
            dp.project(delta, bad)
    with pytest.raises(ValueError, match="k must be an integer"):
        dp.project(delta, k=0)


def test_train_project_and_refine_with_the_mask_fixed(small):
    model, variables, ids = small
    labels = np.array([0, 1, 2, 1], np.int32)
    method = jpeft.compose(dp=dp.diff_pruning(exclude=("classifier",)),
                           head=jpeft.full_finetune(("classifier",)))
    delta = method.init(jax.random.key(0), variables)
    f = jpeft.wrap(model.apply, method)

    def loss(p, d, batch, key):
        logits = f(p, d, batch, delta_rng=key)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return nll + dp.l0_penalty(d["dp"], 1e-3)
    opt = optax.multi_transform(
        {"w": optax.adam(3e-2), "alpha": optax.adam(0.1), "head": optax.adam(1e-2)},
        lambda d: {"dp": dp.labels(d["dp"]), "head": jax.tree.map(lambda _: "head", d["head"])})
    step = jpeft.make_train_step(loss, opt, donate=False)
    state = jpeft.init_opt_state(opt, delta)
    before = float(dp.expected_l0(delta["dp"]))
    for i in range(3):
        delta, state, _ = step(variables, delta, state, ids, jax.random.key(i))
    assert float(dp.expected_l0(delta["dp"])) < before              # the penalty closes gates
    assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(delta["dp"]))
    # Projection to a fixed mask, then a re-fine-tune of the kept entries only.
    n = jpeft.num_params(variables) - jpeft.num_params(variables["params"]["classifier"])
    proj = dp.project(delta["dp"], 0.1)
    assert sparse.num_entries(proj.indices) == int(np.floor(0.1 * n + 0.5))
    refine = jpeft.compose(sparse=sparse.sparse_finetune(proj.indices),
                           head=jpeft.full_finetune(("classifier",)))
    rdelta = {"sparse": proj.values, "head": delta["head"]}
    assert jpeft.num_params(rdelta["sparse"]) == sparse.num_entries(proj.indices)
    # The projected model is the base plus the kept z * w, nothing else.
    pruned = jax.tree.map(np.array, variables)
    for p, d in paths.flatten(dp.differences(delta["dp"])).items():
        keep = np.zeros(np.size(d), bool)
        keep[paths.flatten(proj.indices).get(p, [])] = True
        paths.get_path(pruned, p).reshape(-1)[keep] += np.asarray(d).ravel()[keep]
    pruned = jpeft.full_finetune(("classifier",)).merge(pruned, delta["head"])
    np.testing.assert_allclose(refine.merge(variables, rdelta)["params"]["dense"]["kernel"],
                               pruned["params"]["dense"]["kernel"], atol=1e-7)
    np.testing.assert_allclose(jpeft.wrap(model.apply, refine)(variables, rdelta, ids),
                               model.apply(pruned, ids), atol=1e-6)


def test_structured_group_gate_closes_a_whole_tensor(small):
    _, variables, _ = small
    method = dp.diff_pruning(structured=True)
    delta = _randomise(method.init(jax.random.key(0), variables), w_scale=1.0)
    delta["params"]["dense"]["kernel"]["alpha_group"] = jnp.asarray(-60.0)
    prepare = jax.jit(lambda d, k: method.edits(variables, d, None, Context(rng=k)).params)
    for key in (None, jax.random.key(0)):
        prepared = prepare(delta, key)
        np.testing.assert_array_equal(prepared["params"]["dense"]["kernel"],
                                      variables["params"]["dense"]["kernel"])
        assert not np.array_equal(prepared["params"]["dense"]["bias"],
                                  variables["params"]["dense"]["bias"])


def test_bad_arguments_are_errors(small):
    _, variables, _ = small
    with pytest.raises(ValueError, match="l < 0 and r > 1"):
        dp.diff_pruning(l=0.0)
    with pytest.raises(ValueError, match="diff_pruning: targets"):
        dp.diff_pruning(("dnese",)).init(None, variables)
    with pytest.raises(ValueError, match="not a diff-pruning delta"):
        dp.l0_penalty({"params": {"dense": {"kernel": jnp.zeros(3)}}})


def test_shardings_follow_the_weights(small, mesh):
    _, variables, _ = small
    shards = jpeft.shard_by_rules(variables, mesh, [(r".*/embed/embedding", P(None, "data"))])
    method = dp.diff_pruning(structured=True)
    like = jax.eval_shape(method.init, jax.random.key(0), variables)
    got = paths.flatten(jpeft.delta_shardings(method, shards, like))
    base = paths.flatten(shards)
    for p, s in got.items():
        assert s == (NamedSharding(mesh, P()) if p[-1] == "alpha_group" else base[p[:-1]])
    assert got[("params", "embed", "embedding", "alpha")].spec == P(None, "data")
