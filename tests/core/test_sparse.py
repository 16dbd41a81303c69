"""Sparse deltas: global top-k, scatter merge, the sparse method's forward forms and gradients, and
the stored form through jpeft.checkpoint."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jpeft
from jpeft import checkpoint
from jpeft.core import paths, sparse


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _numpy_top_k(scores, k):
    """Reference: stable sort of all entries by (-score, tree position), first k, per leaf."""
    flat = paths.flatten(scores)
    allv = np.concatenate([np.asarray(x, np.float64).ravel() for x in flat.values()])
    order = np.argsort(-allv, kind="stable")[:k]
    out, start = {}, 0
    for p, x in flat.items():
        n = int(np.size(x))
        local = np.sort(order[(order >= start) & (order < start + n)] - start)
        if local.size:
            out[p] = local
        start += n
    return out


@pytest.fixture
def variables(tiny_bert):
    return {"params": tiny_bert[1]}


def _random_indices(variables, density, seed=0, exclude_head=True):
    rng = np.random.default_rng(seed)
    scores = jax.tree.map(lambda x: rng.random(x.shape).astype(np.float32), variables)
    if exclude_head:
        scores["params"] = {k: v for k, v in scores["params"].items() if k != "classifier"}
    return sparse.top_k_indices(scores, density=density)


def _random_values(indices, seed=1, scale=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda i: jnp.asarray(scale * rng.standard_normal(i.shape), jnp.float32),
                        indices)


def test_top_k_is_global_exact_and_breaks_ties_by_position():
    rng = np.random.default_rng(0)
    # Integer-valued scores: many ties, across leaves and within them.
    scores = {"a": {"kernel": rng.integers(0, 5, (7, 6)).astype(np.float32)},
              "b": rng.integers(0, 5, (30,)).astype(np.float32),
              "c": {"bias": np.full((4,), 4.0, np.float32)}}
    for k in (1, 5, 17, 40, 76):
        got = paths.flatten(sparse.top_k_indices(scores, k=k))
        want = _numpy_top_k(scores, k)
        assert set(got) == set(want) and sparse.num_entries(paths.unflatten(got)) == k
        for p in want:
            assert got[p].dtype == np.int32
            np.testing.assert_array_equal(got[p], want[p])
    # All scores equal: the first k entries in tree order.
    flat = paths.flatten(sparse.top_k_indices(jax.tree.map(np.zeros_like, scores), k=45))
    assert list(flat) == [("a", "kernel"), ("b",)]
    np.testing.assert_array_equal(flat[("a", "kernel")], np.arange(42))
    np.testing.assert_array_equal(flat[("b",)], np.arange(3))


def test_density_gives_the_exact_count_and_bad_requests_are_errors(variables):
    total = jpeft.num_params(variables)
    scores = jax.tree.map(lambda x: np.abs(np.asarray(x)), variables)
    for density in (1 / total, 0.005, 0.25, 1.0):   # 0.25 * 22530 = 5632.5: rounds up
        idx = sparse.top_k_indices(scores, density=density)
        assert sparse.num_entries(idx) == int(np.floor(density * total + 0.5))
    # The decimal as written: 0.35 * 22530 = 7885.5 rounds up (in floats it is 7885.499999999999).
    assert sparse.count_for_density(0.35, 22530) == 7886 and sparse.count_for_density(0.25, 10) == 3
    # A density that is a whole number of entries is achieved exactly.
    idx = sparse.top_k_indices(scores, density=450 / total)
    assert sparse.num_entries(idx) / total == 450 / total
    for bad in (0.0, -0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
            sparse.top_k_indices(scores, density=bad)
    with pytest.raises(ValueError, match="keeps no entry"):
        sparse.top_k_indices(scores, density=0.1 / total)
    for bad in (0, -3, total + 1, 2.0):
        with pytest.raises(ValueError, match="k must be an integer in"):
            sparse.top_k_indices(scores, k=bad)
    with pytest.raises(ValueError, match="exactly one of k or density"):
        sparse.top_k_indices(scores, k=3, density=0.1)
    with pytest.raises(ValueError, match="exactly one of k or density"):
        sparse.top_k_indices(scores)
    with pytest.raises(ValueError, match="NaN"):
        sparse.top_k_indices({"a": np.array([1.0, np.nan])}, k=1)


def test_merge_is_exact_and_unmerge_restores(variables):
    idx = _random_indices(variables, 0.05, exclude_head=False)
    val = _random_values(idx)
    merged_tree = jax.jit(sparse.merge)(variables, idx, val)
    merged = paths.flatten(merged_tree)
    back = paths.flatten(jax.jit(sparse.unmerge)(merged_tree, idx, val))
    dense_tree = jax.jit(sparse.densify)(variables, idx, val)
    dense = paths.flatten(dense_tree)
    flat_i, flat_v = paths.flatten(idx), paths.flatten(val)
    for p, w0 in paths.flatten(variables).items():
        want = np.array(w0, copy=True)
        d = np.zeros_like(want)
        if p in flat_i:
            want.reshape(-1)[flat_i[p]] += np.asarray(flat_v[p])      # float32 numpy, one add each
            d.reshape(-1)[flat_i[p]] = np.asarray(flat_v[p])
            np.testing.assert_array_equal(dense[p], d)
        np.testing.assert_array_equal(merged[p], want)
        tol = 2 * np.finfo(np.float32).eps * (1 + float(np.abs(want).max()))
        np.testing.assert_allclose(back[p], w0, atol=tol, rtol=0)
    jax.tree.map(np.testing.assert_array_equal, jax.jit(sparse.gather)(dense_tree, idx), val)


def _forward(model, method, mode="factored", sites=None):
    f = jpeft.wrap(model.apply, method, sites, mode=mode)
    return jax.jit(lambda p, d, b: f(p, d, **b))


class _Small(nn.Module):
    """Embedding -> Dense -> LayerNorm -> Dense: every kind of leaf the sparse forms treat."""
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(23, 16, name="embed")(ids)
        h = nn.LayerNorm(name="norm")(jnp.tanh(nn.Dense(64, name="dense")(h)))
        return nn.Dense(5, name="out")(h)


@pytest.fixture(scope="module")
def small():
    model = _Small()
    ids = np.random.default_rng(0).integers(0, 23, (4, 16)).astype(np.int32)
    return model, model.init(jax.random.key(0), ids), ids


def test_zero_delta_is_exactly_the_base_model(small):
    model, variables, ids = small
    idx = _random_indices(variables, 0.3, exclude_head=False)
    assert {p[-2] for p in paths.flatten(idx)} == {"embed", "dense", "norm", "out"}
    method = sparse.sparse_finetune(idx)
    zero = method.init(jax.random.key(0), variables)
    # Op by op (no jit), so that the programs differ only by the delta: bit for bit the base.
    base = np.asarray(model.apply(variables, ids))
    sites = jpeft.probe(model.apply, variables, ids)
    for mode in ("factored", "materialised"):
        out = jpeft.wrap(model.apply, method, sites, mode=mode)(variables, zero, ids)
        np.testing.assert_array_equal(np.asarray(out), base)
    jax.tree.map(np.testing.assert_array_equal, method.merge(variables, zero), variables)


def test_merge_equals_the_unmerged_forward_in_both_forms(tiny_bert, tiny_batch, tiny_sites,
                                                        variables):
    model = tiny_bert[0]
    idx = _random_indices(variables, 0.05)
    flat = paths.flatten(idx)
    assert any(p[-1] == "kernel" for p in flat) and any(p[-1] != "kernel" for p in flat)
    method = sparse.sparse_finetune(idx)
    head = jpeft.num_params(variables["params"]["classifier"])
    assert jpeft.num_params(method.init(jax.random.key(0), variables)) == sparse.num_entries(idx) \
        == int(np.floor(0.05 * (jpeft.num_params(variables) - head) + 0.5))
    apply = jax.jit(model.apply)
    val = _random_values(idx)
    merged = np.asarray(apply(jax.jit(method.merge)(variables, val), **tiny_batch))
    # Independent reference: the merged tree built in numpy.
    ref = jax.tree.map(np.array, variables)
    for p, i in flat.items():
        paths.get_path(ref, p).reshape(-1)[i] += np.asarray(paths.flatten(val)[p])
    np.testing.assert_array_equal(merged, np.asarray(apply(ref, **tiny_batch)))
    assert not np.allclose(merged, np.asarray(apply(variables, **tiny_batch)), atol=1e-3)
    fact = _forward(model, method, sites=tiny_sites)(variables, val, tiny_batch)
    mat = _forward(model, method, "materialised")(variables, val, tiny_batch)
    np.testing.assert_allclose(np.asarray(fact), merged, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(mat), merged)


def test_gradients_reach_only_the_selected_entries_and_skip_dense_kernel_gradients(small):
    model, variables, ids = small
    idx = _random_indices(variables, 0.05, exclude_head=False)
    method = sparse.sparse_finetune(idx)
    val = _random_values(idx, scale=0.05)
    target = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 5)), jnp.float32)

    def loss(out):
        return jnp.sum((out - target) ** 2)
    # Reference: the dense gradient with respect to the merged weights, read at the indices.
    dense = jax.jit(jax.grad(lambda p: loss(model.apply(p, ids))))(jax.jit(method.merge)(variables, val))
    want = sparse.gather(dense, idx)
    flops = {}
    sites = jpeft.probe(model.apply, variables, ids)
    for mode in ("factored", "materialised"):
        f = jpeft.wrap(model.apply, method, sites, mode=mode)
        g = jax.jit(jax.grad(lambda v, p: loss(f(p, v, ids)))).lower(val, variables).compile()
        cost = g.cost_analysis()
        flops[mode] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
        got = g(val, variables)
        assert jax.tree.structure(got) == jax.tree.structure(val)      # the values, nothing else
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), got, want)
    # Materialised pays one [in, out] gradient x^T dy per adapted kernel (2 * tokens * in * out);
    # the factored form O(tokens * k).
    n_tokens = ids.size
    flat_p = paths.flatten(variables)
    full = sum(2 * n_tokens * flat_p[p].size for p in paths.flatten(idx) if p[-1] == "kernel")
    assert flops["materialised"] - flops["factored"] >= 0.5 * full, (flops, full)


def test_stored_form_round_trips_through_checkpoint(small, tmp_path):
    model, variables, ids = small
    idx = _random_indices(variables, 0.2, exclude_head=False)
    val = _random_values(idx)
    stored = sparse.to_stored(idx, val)
    assert all(x.dtype == np.int32 for p, x in paths.flatten(stored).items() if p[-1] == "indices")
    ck = checkpoint.save(tmp_path / "ck", stored, metadata={"entries": sparse.num_entries(idx)})
    like = checkpoint.stored_like(ck)
    shape_dtype = lambda t: jax.tree.map(lambda s: (s.shape, np.dtype(s.dtype)), t)
    assert shape_dtype(like) == shape_dtype(sparse.stored_like(idx, variables))
    got = checkpoint.restore(ck, like)["delta"]
    back = sparse.from_stored(got)
    jax.tree.map(np.testing.assert_array_equal, back.indices, idx)
    jax.tree.map(np.testing.assert_array_equal, back.values, val)
    # A restored stored delta runs as is, with the same outputs as the trained values (another
    # program: its indices are arguments, not constants, so equal up to float rounding).
    sites = jpeft.probe(model.apply, variables, ids)
    out = jax.jit(jpeft.wrap(model.apply, sparse.stored_method(), sites))(variables, got, ids)
    want = jax.jit(jpeft.wrap(model.apply, sparse.sparse_finetune(back.indices), sites))(
        variables, val, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6, rtol=0)
    merged = jax.jit(sparse.stored_method().merge)(variables, got)
    jax.tree.map(np.testing.assert_array_equal, merged, jax.jit(sparse.merge)(variables, idx, val))


def test_size_on_disk_scales_with_the_kept_entries(variables, tmp_path):
    flat = paths.flatten(variables)
    tensors = [p for p in flat if p[-1] == "kernel" and "classifier" not in p][:3]
    sizes = {}
    for m in (8, 800):                       # entries per tensor, the same three tensors
        idx = paths.unflatten({p: np.arange(0, 2 * m, 2, dtype=np.int32) for p in tensors})
        val = _random_values(idx, seed=m)
        sizes[m] = _dir_bytes(checkpoint.save(tmp_path / f"m{m}", sparse.to_stored(idx, val)))
    # 3 * 792 more entries cost at least their float32 values (random: incompressible) and at most
    # values plus int32 indices; the fixed part is small next to the model.
    extra = 3 * (800 - 8)
    assert 4 * extra * 0.9 <= sizes[800] - sizes[8] <= 8 * extra * 1.1, sizes
    assert sizes[8] < jpeft.num_bytes(variables)


def test_bad_indices_are_errors(variables):
    with pytest.raises(ValueError, match="no entries selected"):
        sparse.sparse_finetune({})
    with pytest.raises(ValueError, match="1-D integer"):
        sparse.sparse_finetune({"params": {"classifier": {"bias": np.array([0.5])}}})
    bad = {"params": {"classifier": {"bias": np.array([0, 5], np.int32)}}}
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        sparse.sparse_finetune(bad).init(jax.random.key(0), variables)
    bad = {"params": {"classifier": {"kernel": np.array([3, 1], np.int32)}}}
    with pytest.raises(ValueError, match="sorted and unique"):
        sparse.sparse_finetune(bad).init(jax.random.key(0), variables)
    bad = {"params": {"classifer": {"bias": np.array([0], np.int32)}}}
    with pytest.raises(ValueError, match="no such leaf"):
        sparse.sparse_finetune(bad).init(jax.random.key(0), variables)
    with pytest.raises(ValueError, match="not initialised"):
        sparse.stored_method().init(jax.random.key(0), variables)
    with pytest.raises(ValueError, match="not a stored sparse delta"):
        sparse.from_stored({"a": {"indices": np.zeros(1, np.int32)}})


def test_values_are_replicated_on_the_mesh_of_their_weight(small, mesh):
    _, variables, _ = small
    shards = jpeft.shard_by_rules(variables, mesh, [(r".*/dense/kernel", P(None, "model"))])
    idx = _random_indices(variables, 0.2, exclude_head=False)
    method = sparse.sparse_finetune(idx)
    like = jax.eval_shape(method.init, jax.random.key(0), variables)
    for s in jax.tree.leaves(jpeft.delta_shardings(method, shards, like)):
        assert isinstance(s, NamedSharding) and s.mesh == mesh and s.spec == P()
    stored_like = sparse.stored_like(idx, variables)
    for s in jax.tree.leaves(sparse.stored_method().shardings(shards, stored_like)):
        assert isinstance(s, NamedSharding) and s.spec == P()
