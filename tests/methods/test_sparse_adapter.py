"""SparseAdapter: an adapter pruned at initialisation (magnitude, SNIP, random), mask fixed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import zoo
from conftest import perturb
from jpeft.core import paths as paths_lib
from jpeft.methods import adapters
from jpeft.methods import sparse_adapter as sa


@pytest.fixture(scope="module")
def bert():
    s = zoo.build("linen_bert")
    return s, jpeft.probe(s.apply, s.params, *s.args)


def test_masked_adapter_trains_only_kept_entries_and_rebuilds_from_config(bert):
    s, sites = bert
    dense = adapters.bottleneck((adapters.FFN_SEQUENTIAL,), bottleneck_size=16)
    scoring = sa.scoring_init(dense, jax.random.key(0), s.params, sites)
    masks = sa.prune_masks(scoring, 0.75, criterion="magnitude")
    for p, m in masks.items():                       # a quarter of each matrix, the largest |w|
        w = np.abs(np.asarray(paths_lib.flatten(scoring)[p]))
        assert m.sum() == w.size // 4
        assert w[m].min() >= w[~m].max()
    method = sa.sparse_adapter(masks, bottleneck_size=16)
    delta = method.init(jax.random.key(0), s.params, sites)
    np.testing.assert_array_equal(jax.jit(jpeft.wrap(s.apply, method, sites))(
        s.params, delta, *s.args), jax.jit(s.apply)(s.params, *s.args))
    # kept entries + biases: 2 layers x (16 x 32 / 4 x 2 + 16 + 32)
    kept = 2 * (2 * 16 * 32 // 4 + 16 + 32)
    assert sa.trainable_count(delta, masks) == kept
    # the method and any composition with it count the same (param_report, the presets' logs)
    assert jpeft.param_report(s.params, delta, method).trainable == kept
    both = jpeft.compose(sa=method, bitfit=jpeft.bitfit())
    both_delta = both.init(jax.random.key(0), s.params, sites)
    assert jpeft.trainable_count(both_delta, both) == kept + jpeft.num_params(both_delta["bitfit"])
    assert jpeft.param_report(s.params, delta).trainable == jpeft.num_params(delta) > kept
    delta = perturb(delta, scale=0.3)
    got = jpeft.wrap(s.apply, method, sites)(s.params, delta, *s.args)
    flat = paths_lib.flatten(delta)
    hand = paths_lib.unflatten({p: (v * masks[p] if p in masks else v) for p, v in flat.items()})
    want = jpeft.wrap(s.apply, dense, sites)(s.params, hand, *s.args)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda d: jpeft.wrap(s.apply, method, sites)(s.params, d, *s.args).sum())(delta)
    for p, m in masks.items():
        gp = np.asarray(paths_lib.flatten(g)[p])
        assert np.all(gp[~m] == 0) and np.any(gp[m] != 0)
    rebuilt = jpeft.methods.from_config(json.loads(json.dumps(method.config)))
    np.testing.assert_array_equal(jpeft.wrap(s.apply, rebuilt, sites)(s.params, delta, *s.args),
                                  got)


def test_snip_and_random_masks(bert):
    s, sites = bert
    dense = adapters.bottleneck((adapters.FFN_SEQUENTIAL,), bottleneck_size=8)
    scoring = sa.scoring_init(dense, jax.random.key(1), s.params, sites)
    f = jpeft.wrap(s.apply, dense, sites)
    loss = lambda d: jnp.sum(f(s.params, d, *s.args) ** 2)
    scores = sa.snip_scores(loss, scoring)
    masks = sa.prune_masks(scoring, 0.5, criterion="snip", scores=scores)
    for p, m in masks.items():
        sc = np.asarray(paths_lib.flatten(scores)[p])
        assert sc[m].min() >= sc[~m].max() and m.mean() == 0.5
    rnd = sa.prune_masks(scoring, 0.5, criterion="random", key=jax.random.key(3))
    assert all(m.mean() == 0.5 for m in rnd.values())
    with pytest.raises(ValueError, match="needs scores"):
        sa.prune_masks(scoring, 0.5, criterion="snip")
    with pytest.raises(ValueError, match="sparsity"):
        sa.prune_masks(scoring, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        sa.sparse_adapter(masks, bottleneck_size=4).init(jax.random.key(0), s.params, sites)
