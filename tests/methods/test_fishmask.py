"""FishMask: the empirical Fisher against a plain numpy per-example loop, chunking, the global
top-k mask, training only the masked entries, and the errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.core import paths, sparse
from jpeft.methods import fishmask as fm


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="classifier")(jnp.tanh(nn.Dense(5, name="hidden")(x)))


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    n = 11
    data = {"x": rng.standard_normal((n, 4)).astype(np.float32),
            "labels": rng.integers(0, 3, n).astype(np.int32)}
    model = _MLP()
    variables = model.init(jax.random.key(0), data["x"][:1])
    logprob = fm.label_log_likelihood(lambda p, ex: model.apply(p, ex["x"][None])[0])
    return model, variables, data, logprob


def _numpy_fisher(variables, data):
    """Per-example gradients of log p(y | x) by hand, in float64, one example at a time."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)["params"]
    w1, b1 = p["hidden"]["kernel"], p["hidden"]["bias"]
    w2, b2 = p["classifier"]["kernel"], p["classifier"]["bias"]
    acc = {k: np.zeros_like(v) for k, v in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2))}
    for x, y in zip(np.asarray(data["x"], np.float64), data["labels"]):
        h = np.tanh(x @ w1 + b1)
        logits = h @ w2 + b2
        prob = np.exp(logits - logits.max())
        prob /= prob.sum()
        g = np.eye(3)[y] - prob                      # d log p(y) / d logits
        da = (w2 @ g) * (1 - h ** 2)
        for name, grad in (("w1", np.outer(x, da)), ("b1", da), ("w2", np.outer(h, g)), ("b2", g)):
            acc[name] += grad ** 2
    n = len(data["labels"])
    return {"params": {"hidden": {"kernel": acc["w1"] / n, "bias": acc["b1"] / n},
                       "classifier": {"kernel": acc["w2"] / n, "bias": acc["b2"] / n}}}


def test_fisher_matches_a_numpy_per_example_loop(mlp):
    _, variables, data, logprob = mlp
    fisher = fm.fisher_information(logprob, variables, data, chunk_size=4)
    want = _numpy_fisher(variables, data)
    assert jax.tree.structure(fisher) == jax.tree.structure(variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9), fisher, want)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fisher))


def test_chunking_does_not_change_the_result_and_runs_are_deterministic(mlp):
    _, variables, data, logprob = mlp
    n = len(data["labels"])
    ref = fm.fisher_information(logprob, variables, data, chunk_size=4)     # 11 = 4 + 4 + 3 (padded)
    again = fm.fisher_information(logprob, variables, data, chunk_size=4)
    jax.tree.map(np.testing.assert_array_equal, again, ref)                # same order, same bits
    for c in (1, 3, n, n + 5):
        got = fm.fisher_information(logprob, variables, data, chunk_size=c)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), got, ref)
    # The weight-0 padding of the last chunk adds nothing: 11 examples in chunks of 4 equal the
    # first 8 (two full chunks) plus the last 3, weighted by their counts.
    head = fm.fisher_information(logprob, variables, jax.tree.map(lambda x: x[:8], data), chunk_size=4)
    tail = fm.fisher_information(logprob, variables, jax.tree.map(lambda x: x[8:], data), chunk_size=4)
    jax.tree.map(lambda r, a, b: np.testing.assert_allclose(r, (8 * a + 3 * b) / 11, rtol=1e-5),
                 ref, head, tail)


def test_fisher_errors(mlp):
    _, variables, data, logprob = mlp
    with pytest.raises(ValueError, match="no examples"):
        fm.fisher_information(logprob, variables, jax.tree.map(lambda x: x[:0], data))
    with pytest.raises(ValueError, match="no examples"):
        fm.fisher_information(logprob, variables, {})
    with pytest.raises(ValueError, match="same leading"):
        fm.fisher_information(logprob, variables, {"x": data["x"], "labels": data["labels"][:3]})
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
            fm.fisher_information(logprob, variables, data, chunk_size=bad)


def test_mask_is_the_exact_global_top_k_of_the_selected_tensors(mlp):
    _, variables, data, logprob = mlp
    fisher = fm.fisher_information(logprob, variables, data, chunk_size=4)
    hidden = fisher["params"]["hidden"]
    n = jpeft.num_params(hidden)                                          # 4 * 5 + 5 = 25
    for density in (0.04, 0.2, 0.52, 1.0):
        idx = fm.fishmask_indices(fisher, density=density, exclude=("classifier",))
        k = int(np.floor(density * n + 0.5))
        assert sparse.num_entries(idx) == k and sparse.num_entries(idx) / n == pytest.approx(density)
        assert "classifier" not in idx["params"]
        # numpy reference: stable ranking of the hidden layer's entries (bias before kernel).
        allv = np.concatenate([np.ravel(hidden["bias"]), np.ravel(hidden["kernel"])])
        order = np.sort(np.argsort(-allv, kind="stable")[:k])
        got = paths.flatten(idx)
        np.testing.assert_array_equal(got.get(("params", "hidden", "bias"), []), order[order < 5])
        np.testing.assert_array_equal(got.get(("params", "hidden", "kernel"), []),
                                      order[order >= 5] - 5)
    assert sparse.num_entries(fm.fishmask_indices(fisher, k=6)) == 6
    for bad in (0.0, -0.2, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
            fm.fishmask_indices(fisher, density=bad)
    with pytest.raises(ValueError, match="k must be an integer"):
        fm.fishmask_indices(fisher, k=0)
    with pytest.raises(ValueError, match="fishmask: targets"):
        fm.fishmask_indices(fisher, density=0.1, targets=("hiden",))


def test_training_changes_only_the_masked_entries(mlp):
    model, variables, data, logprob = mlp
    fisher = fm.fisher_information(logprob, variables, data, chunk_size=4)
    idx = fm.fishmask_indices(fisher, density=0.2, exclude=("classifier",))
    method = jpeft.compose(fishmask=fm.fishmask(idx), head=jpeft.full_finetune(("classifier",)))
    delta = method.init(jax.random.key(0), variables)
    assert method.config["compose"]["fishmask"]["method"] == "fishmask"
    assert jpeft.num_params(delta["fishmask"]) == 5 and jpeft.num_params(delta["head"]) == 18
    f = jpeft.wrap(model.apply, method)
    np.testing.assert_array_equal(f(variables, delta, data["x"]), model.apply(variables, data["x"]))

    def loss(p, d, batch, key):
        logits = f(p, d, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    opt = optax.adam(0.1)
    step = jpeft.make_train_step(loss, opt, donate=False)
    state = jpeft.init_opt_state(opt, delta)
    for i in range(2):
        delta, state, _ = step(variables, delta, state, data, jax.random.key(i))
    merged = method.merge(variables, delta)
    changed_any = False
    for name, size in (("kernel", 20), ("bias", 5)):
        changed = (np.asarray(merged["params"]["hidden"][name])
                   != np.asarray(variables["params"]["hidden"][name])).ravel()
        mask = np.zeros(size, bool)
        mask[idx["params"]["hidden"].get(name, np.zeros(0, np.int32))] = True
        assert not (changed & ~mask).any(), name              # nothing outside the mask moved
        changed_any |= bool(changed.any())
    assert changed_any
    np.testing.assert_allclose(model.apply(merged, data["x"]), f(variables, delta, data["x"]), atol=1e-6)


def test_a_scan_stacked_classifier_trains_its_masked_entries_factored():
    """FishMask on a ``[L, in, out]`` kernel under ``lax.scan``: the factored edit (entries grouped
    per layer, sliced with the weight) equals the numpy-merged weights, and training moves only the
    masked entries."""
    def apply(p, x):
        def body(h, w):
            return jnp.tanh(h @ w), None
        h, _ = jax.lax.scan(body, x, p["layers"]["kernel"])
        return h @ p["classifier"]["kernel"]
    rng = np.random.default_rng(0)
    params = {"layers": {"kernel": rng.standard_normal((3, 4, 4)).astype(np.float32) / 2},
              "classifier": {"kernel": rng.standard_normal((4, 3)).astype(np.float32)}}
    data = {"x": rng.standard_normal((9, 4)).astype(np.float32),
            "labels": rng.integers(0, 3, 9).astype(np.int32)}
    logprob = fm.label_log_likelihood(lambda p, ex: apply(p, ex["x"][None])[0])
    fisher = fm.fisher_information(logprob, params, data, chunk_size=4)
    idx = fm.fishmask_indices(fisher, density=0.25, exclude=("classifier",))
    flat_idx = idx["layers"]["kernel"]
    assert flat_idx.size == 12
    sites = jpeft.probe(apply, params, data["x"])
    assert sites.contractions[("layers", "kernel")].scanned == (0,)
    method = fm.fishmask(idx)
    f = jpeft.wrap(apply, method, sites)
    delta = jax.tree.map(lambda v: v + 0.3, method.init(jax.random.key(0), params, sites))
    assert ("layers", "kernel") in method.edits(params, delta, sites,
                                                 jpeft.Context("factored")).contractions
    ref = jax.tree.map(np.array, params)
    ref["layers"]["kernel"].reshape(-1)[flat_idx] += 0.3
    np.testing.assert_allclose(f(params, delta, data["x"]), apply(ref, data["x"]), atol=1e-5)

    def loss(p, d, batch, key):
        logits = f(p, d, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    opt = optax.adam(0.1)
    step = jpeft.make_train_step(loss, opt, donate=False)
    delta = method.init(jax.random.key(0), params, sites)
    state = jpeft.init_opt_state(opt, delta)
    losses = []
    for i in range(3):
        delta, state, m = step(params, delta, state, data, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    changed = (np.asarray(method.merge(params, delta)["layers"]["kernel"])
               != params["layers"]["kernel"]).ravel()
    mask = np.zeros(changed.size, bool)
    mask[flat_idx] = True
    assert changed.any() and not (changed & ~mask).any()
