"""Sparse deltas: global top-k, scatter merge, the sparse method's forward forms and gradients,
saving by name, and the stored form (traced indices)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jpeft
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


def test_saved_by_name_and_the_stored_form(small, tmp_path):
    """The indices are the method's data: jpeft.save / jpeft.load round trip. The stored form
    (indices next to values, the delta of ``stored_method``) runs with traced indices."""
    model, variables, ids = small
    idx = _random_indices(variables, 0.2, exclude_head=False)
    val = _random_values(idx)
    jpeft.save(tmp_path / "ck", sparse.sparse_finetune(idx), val)
    loaded = jpeft.load(tmp_path / "ck", variables)
    jax.tree.map(np.testing.assert_array_equal, loaded.method.data, idx)
    jax.tree.map(np.testing.assert_array_equal, loaded.delta, val)
    got = jax.tree.map(jnp.asarray, sparse.to_stored(idx, val))
    assert all(x.dtype == np.int32 for p, x in paths.flatten(got).items() if p[-1] == "indices")
    shape_dtype = lambda t: jax.tree.map(lambda s: (s.shape, np.dtype(s.dtype)), t)
    assert shape_dtype(got) == shape_dtype(sparse.stored_like(idx, variables))
    back = sparse.from_stored(got)
    jax.tree.map(np.testing.assert_array_equal, back.indices, idx)
    jax.tree.map(np.testing.assert_array_equal, back.values, val)
    # A stored delta runs as is, with the same outputs as the trained values (another program:
    # its indices are arguments, not constants, so equal up to float rounding).
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
        sizes[m] = _dir_bytes(jpeft.save(tmp_path / f"m{m}", sparse.sparse_finetune(idx), val))
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


# ------------------------------------------------------------------------------------------------
# The factored form on every dot layout: plain-JAX models, references built by hand in numpy


def _layouts_apply(p, x):
    """One weight per layout (x: [b, t, 6]): DenseGeneral-like ``q [6, 2, 3]`` (free (1, 2)),
    attention-output ``o [2, 3, 5]`` (contract (0, 1)), an einsum weight contracted over its
    middle axis ``mid [2, 5, 4]``, a dot-batched ``batched [2, 4, 3]`` (stack (0,)), the dot's
    first operand ``lhs [6, 4]``, and ``perm [3, 2, 6]`` whose free axes the dot holds reversed."""
    q = jnp.einsum("btd,dnh->btnh", x, p["q"]["kernel"]) + p["q"]["bias"]
    o = jnp.einsum("btnh,nhd->btd", jnp.tanh(q), p["o"]["kernel"])
    e = jnp.einsum("btd,sdh->sbth", o, p["mid"]["kernel"])
    z = jnp.einsum("sbth,shf->sbtf", jnp.tanh(e), p["batched"]["kernel"])
    lhs = jax.lax.dot_general(p["lhs"]["kernel"], x, (((0,), (2,)), ((), ())))
    perm = jax.lax.dot_general(x, jnp.transpose(p["perm"]["kernel"], (2, 1, 0)),
                               (((2,), (0,)), ((), ())))
    return z, lhs, perm


def _scan_apply(p, x):
    """Three layers ``[L=3, 6, 6]`` (bias ``[3, 6]``) under ``lax.scan``, then a head."""
    def body(h, w):
        return jnp.tanh(h @ w["kernel"] + w["bias"]), None
    h, _ = jax.lax.scan(body, x, p["layers"])
    return h @ p["head"]["kernel"]


def _tree_close(got, want, atol=2e-5):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         atol=atol, rtol=1e-5), got, want)


@pytest.fixture(scope="module")
def layout_models():
    rng = np.random.default_rng(3)
    n = lambda *s: rng.standard_normal(s).astype(np.float32)
    lp = {"q": {"kernel": n(6, 2, 3), "bias": n(2, 3)}, "o": {"kernel": n(2, 3, 5)},
          "mid": {"kernel": n(2, 5, 4)}, "batched": {"kernel": n(2, 4, 3)},
          "lhs": {"kernel": n(6, 4)}, "perm": {"kernel": n(3, 2, 6)}}
    sp = {"layers": {"kernel": n(3, 6, 6), "bias": n(3, 6)}, "head": {"kernel": n(6, 2)}}
    x = n(2, 3, 6)
    # Stacked kernel: 5 entries in layer 0, none in layer 1, 2 in layer 2 (uneven, one empty).
    stacked_idx = np.sort(np.concatenate([rng.choice(36, 5, replace=False),
                                          72 + rng.choice(36, 2, replace=False)])).astype(np.int32)
    lidx = {p: np.sort(rng.choice(np.size(w), max(2, np.size(w) // 4), replace=False))
            .astype(np.int32) for p, w in paths.flatten(lp).items()}
    return {"layouts": (_layouts_apply, lp, (x,), jpeft.probe(_layouts_apply, lp, x),
                        paths.unflatten(lidx)),
            "stacked": (_scan_apply, sp, (x,), jpeft.probe(_scan_apply, sp, x),
                        {"layers": {"kernel": stacked_idx, "bias": np.array([1, 8], np.int32)},
                         "head": {"kernel": np.array([0, 5, 11], np.int32)}})}


def _numpy_merged(params, indices, values):
    """``W.ravel()[idx] += v`` per leaf, in numpy (float32)."""
    out = jax.tree.map(lambda a: np.array(a, np.float32), params)
    flat_v = paths.flatten(values)
    for p, i in paths.flatten(indices).items():
        paths.get_path(out, p).reshape(-1)[i] += np.asarray(flat_v[p])
    return out


@pytest.mark.parametrize("model", ["layouts", "stacked"])
def test_factored_edit_on_every_dot_layout_equals_the_numpy_merge(model, layout_models):
    apply, params, args, sites, idx = layout_models[model]
    method = sparse.sparse_finetune(idx)
    val = _random_values(idx, scale=0.5)
    # Every contraction weight gets a factored edit (biases are merged); under the scan the stacked
    # kernel's entries are grouped per layer.
    edits = []
    jax.eval_shape(lambda p, v: edits.append(method.edits(p, v, sites, jpeft.Context("factored"))
                                             .contractions), params, val)
    weights = {p for p in paths.flatten(idx) if p in sites.contractions}
    assert set(edits[0]) == weights and weights
    if model == "stacked":
        fs = edits[0][("layers", "kernel")].factors
        assert fs["idx"].value.shape == (3, 5) and fs["idx"].axes == (0, None)
        np.testing.assert_array_equal(fs["valid"].value.sum(1), [5, 0, 2])
    want = jax.jit(apply)(_numpy_merged(params, idx, val), *args)
    fact = jax.jit(jpeft.wrap(apply, method, sites))(params, val, *args)
    mat = jax.jit(jpeft.wrap(apply, method, sites, mode="materialised"))(params, val, *args)
    merged = jax.jit(lambda p, v: apply(method.merge(p, v), *args))(params, val)
    for got in (fact, mat, merged):
        _tree_close(got, want)
    base = jax.jit(apply)(params, *args)
    assert not all(np.allclose(a, b, atol=1e-3) for a, b in zip(jax.tree.leaves(fact),
                                                                 jax.tree.leaves(base)))
    # A zero delta is the base model, bit for bit.
    zero = method.init(jax.random.key(0), params, sites)
    out = jax.jit(jpeft.wrap(apply, method, sites))(params, zero, *args)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), out, base)


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


@pytest.mark.parametrize("model", ["layouts", "stacked"])
def test_every_dot_layout_gradients_reach_only_the_entries(model, layout_models):
    apply, params, args, sites, idx = layout_models[model]
    method = sparse.sparse_finetune(idx)
    val = _random_values(idx, scale=0.3)
    loss = lambda out: sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out))
    dense = jax.jit(jax.grad(lambda p: loss(apply(p, *args))))(_numpy_merged(params, idx, val))
    want = {p: np.asarray(paths.get_path(dense, p)).reshape(-1)[i]
            for p, i in paths.flatten(idx).items()}
    dots = {}
    for mode in ("factored", "materialised"):
        f = jpeft.wrap(apply, method, sites, mode=mode)
        g = jax.grad(lambda v, p: loss(f(p, v, *args)))
        dots[mode] = set(_dot_output_shapes(jax.make_jaxpr(g)(val, params).jaxpr))
        got = jax.jit(g)(val, params)
        assert jax.tree.structure(got) == jax.tree.structure(val)
        for p, w in want.items():
            np.testing.assert_allclose(paths.flatten(got)[p], w, atol=1e-4, rtol=1e-4)
    # The factored step runs only dots that the materialised one also runs; the latter adds the
    # weight gradients x^T dy (on the stacked model: each layer's [6, 6] and the head's [2, 6]).
    assert dots["factored"] < dots["materialised"], dots
    if model == "stacked":
        assert {(6, 6), (2, 6)} <= dots["materialised"] - dots["factored"], dots


def test_stored_method_on_a_stacked_weight_masks_other_layers(layout_models):
    """A restored stored delta under jit has traced indices: every scan iteration then masks the
    entries of other layers (the 'layer' factor) instead of grouping them on the host."""
    apply, params, args, sites, idx = layout_models["stacked"]
    val = _random_values(idx, scale=0.5)
    stored = jax.tree.map(jnp.asarray, sparse.to_stored(idx, val))
    edits = jax.jit(lambda s: sparse.stored_method().edits(
        params, s, sites, jpeft.Context("factored")).contractions[("layers", "kernel")].factors
        ["layer"].value)(stored)
    np.testing.assert_array_equal(edits, [0, 1, 2])
    got = jax.jit(jpeft.wrap(apply, sparse.stored_method(), sites))(params, stored, *args)
    _tree_close(got, apply(_numpy_merged(params, idx, val), *args))


def test_conv_kernels_and_weights_with_other_uses_stay_merged():
    def apply(p, x):
        h = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return h @ p["tied"]["kernel"] + jnp.sum(p["tied"]["kernel"])
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.standard_normal((3, 3, 2, 4)).astype(np.float32)},
              "tied": {"kernel": rng.standard_normal((4, 3)).astype(np.float32)}}
    x = rng.standard_normal((1, 5, 5, 2)).astype(np.float32)
    sites = jpeft.probe(apply, params, x)
    assert not sparse.has_factored_form(sites.contractions[("tied", "kernel")])
    idx = {"conv": {"kernel": np.array([0, 7, 40], np.int32)},
           "tied": {"kernel": np.array([2, 5], np.int32)}}
    val = _random_values(idx, scale=0.5)
    method = sparse.sparse_finetune(idx)
    assert not method.edits(params, val, sites, jpeft.Context("factored")).contractions
    _tree_close(jpeft.wrap(apply, method, sites)(params, val, x),
                apply(_numpy_merged(params, idx, val), x), atol=1e-4)
