"""The contract every method keeps on every model style (``tests/zoo.py``).

For each (style, method): a zero delta reproduces the base model in both forward forms; with a
non-zero delta the factored form equals the materialised one and the merged parameters give the
same outputs; a jitted train step lowers the loss and changes only the delta; a checkpoint round
trip reproduces the outputs bit for bit; and where the method has a factored form, the factored
train step needs fewer FLOPs than the materialised one (no full weight gradient).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
import zoo
from jpeft import checkpoint
from jpeft.core import paths
from jpeft.core import sparse as sparse_lib
from jpeft import methods
from jpeft.methods import adapters, ia3, prefix, prompt, unipelt
from jpeft.methods import far as far_lib
from jpeft.methods import fishmask as fishmask_lib

#: Methods that change contractions (their edits depend on how each weight is contracted): every
#: style. Methods that only transform parameters (the same code path in both forward forms, no
#: sites): the styles that stress the parameter tree most (stacked, N-D, NNX), to keep the suite
#: within its time budget on a 2-core machine.
SITE_METHODS = ("lora",)
PARAM_METHODS = ("full", "bitfit", "diff_pruning")
PARAM_STYLES = ("linen_einsum", "linen_scan_remat", "nnx_decoder_scan")
#: DID/SAID project every tensor (one code path for any tree): the scan-stacked linen style.
INTRINSIC_STYLES = ("linen_scan_remat",)
#: FAR on every distinct layout: 3-D DenseGeneral, middle-axis einsum, conv, scan-stacked (linen
#: and NNX, 2-D per layer); plain 2-D BERT kernels are tests/methods/test_far.py's own model.
FAR_STYLES = ("linen_mha", "linen_einsum", "linen_scan_remat", "linen_conv", "nnx_decoder_scan")
#: AdaLoRA's factors are laid out by LoRA's code (its own part is the triplet's ``lam``), and the
#: sparse factored form's layouts are covered by these styles (2-D, 3-D DenseGeneral, middle-axis
#: einsum, scan-stacked, conv merged): each on the styles that stress its own code, within the
#: suite's time budget on a 2-core machine.
ADALORA_STYLES = ("linen_mha", "linen_scan_remat")
FISHMASK_STYLES = ("linen_mha", "linen_einsum", "linen_scan_remat")   # conv: test_sparse.py
CASES = ([(st, m) for st in zoo.NAMES for m in SITE_METHODS]
         + [(st, "far") for st in FAR_STYLES]
         + [(st, "adalora") for st in ADALORA_STYLES]
         + [(st, "fishmask") for st in FISHMASK_STYLES]
         + [(st, m) for st in PARAM_STYLES for m in PARAM_METHODS]
         + [(st, m) for st in INTRINSIC_STYLES for m in ("did", "said")])


_STYLES: dict = {}


def _style(name):
    """The style and its sites, built once per session."""
    if name not in _STYLES:
        s = zoo.build(name)
        _STYLES[name] = (s, jpeft.probe(s.apply, s.params, *s.args))
    return _STYLES[name]


def _fisher_indices(s: zoo.Style):
    """FishMask's mask from the empirical Fisher of ``-|f(x)|^2`` over the style's examples."""
    def logprob(params, example):
        return -jnp.sum(s.apply(params, *(a[None] for a in example)) ** 2)
    fisher = fishmask_lib.fisher_information(logprob, s.params, s.args, chunk_size=2)
    return fishmask_lib.fishmask_indices(fisher, density=0.05)


def _build(name: str, s: zoo.Style, sites) -> tuple[jpeft.Method, bool]:
    """The method under test and whether it has a factored form cheaper than the materialised
    one on this style."""
    conv = s.name == "linen_conv"
    targets = r".*(conv1|conv2|head)" if conv else "all-linear"
    if name == "full":
        return jpeft.full_finetune(), False
    if name == "bitfit":
        return jpeft.bitfit(), False
    if name == "lora":
        return jpeft.lora(targets, rank=2, alpha=4), True
    if name == "adalora":
        return jpeft.adalora(targets, init_r=2, alpha=2), True
    if name == "diff_pruning":
        return jpeft.diff_pruning(), False
    if name == "far":
        # The style's feed-forward weights where it names them, else every contraction weight
        # but the output head: 3-D DenseGeneral, middle-axis einsum, scan-stacked and conv
        # kernels, each by its own layout (columns = output features, per stack slice).
        targets = s.ffn or [paths.path_str(p[:-1]) for p in sites.contractions
                            if p[-2] not in ("head", "lm_head", "classifier")]
        scores = far_lib.far_magnitude_scores(s.params, targets, sites=sites)
        return jpeft.far(far_lib.far_select(scores, 0.25)), True
    if name == "fishmask":
        idx = _fisher_indices(s)
        # Cheaper only where every masked contraction weight has the matrix layout the sparse
        # edit serves (elsewhere the masked weights are merged: the materialised cost).
        weights = [p for p in paths.flatten(idx) if p in sites.contractions or p in sites.conflicts]
        matrix = bool(weights) and all(sparse_lib.is_matrix(sites.contractions.get(p))
                                       for p in weights)
        return jpeft.fishmask(idx), matrix
    if name == "did":
        return jpeft.did(16), False
    if name == "said":
        return jpeft.said(24), False
    raise ValueError(name)


def _grad_flops(loss, params, delta) -> float:
    """FLOPs of ``grad(loss)`` from the lowered program's cost analysis (no XLA compile)."""
    cost = jax.jit(jax.grad(loss, argnums=1)).lower(params, delta).cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def _perturbed(delta, key, scale=0.05):
    leaves, treedef = jax.tree.flatten(delta)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("style_name,method_name", CASES)
def test_contract(style_name, method_name, tmp_path):
    s, sites = _style(style_name)
    method, cheaper = _build(method_name, s, sites)
    fact = jpeft.wrap(s.apply, method, sites)
    mat = jpeft.wrap(s.apply, method, sites, mode="materialised")
    out_shape = jax.eval_shape(lambda p: s.apply(p, *s.args), s.params).shape
    target = np.random.default_rng(2).standard_normal(out_shape).astype(np.float32)
    loss = lambda p, d, *_: jnp.mean((fact(p, d, *s.args) - target) ** 2)
    opt = optax.adam(1e-3 if method_name == "full" else 1e-2)
    step = jpeft.make_train_step(loss, opt, donate=False)

    # One compiled program for every check (this suite runs ~45 combinations on 2 cores).
    @jax.jit
    def checks(p, key):
        d0 = method.init(key, p, sites)
        d = _perturbed(d0, jax.random.fold_in(key, 1))
        outs = (s.apply(p, *s.args), fact(p, d0, *s.args), mat(p, d0, *s.args),
                fact(p, d, *s.args), mat(p, d, *s.args),
                s.apply(method.merge(p, d, sites), *s.args))

        def train(carry, i):                  # the jitted train step, four times
            dd, st = carry
            dd, st, m = step(p, dd, st, None, jax.random.key(i))
            return (dd, st), m["loss"]
        (trained, _), losses = jax.lax.scan(train, (d0, opt.init(d0)), jnp.arange(4))
        return outs, losses, d0, d, trained
    outs, losses, delta0, delta, trained = checks(s.params, jax.random.key(1))
    base, zero_f, zero_m, out_f, out_m, merged = (np.asarray(o) for o in outs)

    scale = float(np.abs(base).max()) + 1.0
    np.testing.assert_allclose(zero_f, base, atol=1e-6 * scale, rtol=0)
    np.testing.assert_allclose(zero_m, base, atol=1e-6 * scale, rtol=0)
    assert not np.allclose(out_f, base, atol=1e-5 * scale), "the perturbed delta changes nothing"
    np.testing.assert_allclose(out_f, out_m, atol=2e-5 * scale, rtol=1e-4)
    np.testing.assert_allclose(merged, out_f, atol=2e-5 * scale, rtol=1e-4)
    # Training lowered the loss; its output is a delta (the base parameters are only an input).
    assert float(losses[-1]) < float(losses[0]), losses
    assert jax.tree.structure(trained) == jax.tree.structure(delta0)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained),
                                                         jax.tree.leaves(delta0)))

    # Checkpoint round trip of the trained delta: every array back bit for bit, and the sites.
    checkpoint.save(tmp_path / "ck", trained, metadata={"config": method.config,
                                                        "sites": sites.to_json()})
    like = jax.eval_shape(lambda k, p: method.init(k, p, sites), jax.random.key(0), s.params)
    got = checkpoint.restore(tmp_path / "ck", like)
    assert jpeft.Sites.from_json(got["metadata"]["sites"]) == sites
    for a, b in zip(jax.tree.leaves(got["delta"]), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The factored step never pays for a full weight gradient.
    if cheaper:
        m_loss = lambda p, dd, *_: jnp.mean((mat(p, dd, *s.args) - target) ** 2)
        f_flops, m_flops = _grad_flops(loss, s.params, delta), _grad_flops(m_loss, s.params, delta)
        assert f_flops < m_flops, (f_flops, m_flops)


# --------------------------------------------------------------------------------------------
# Additive and hybrid methods (they change activations at marks): both reference models, the
# linen BERT and the NNX decoder with its layers stacked by nnx.scan.

ADDITIVE = {
    # name: (factory, starts at the base model exactly, mergeable)
    "houlsby": (lambda: adapters.houlsby(reduction_factor=4), True, False),
    "parallel": (lambda: adapters.parallel(bottleneck_size=4, scaling="learned"),
                 True, False),
    "multihead": (lambda: adapters.multihead_parallel(bottleneck_size=8), True,
                  False),
    "ia3": (lambda: ia3.ia3(), True, True),
    "prefix": (lambda: prefix.prefix_tuning(3, reparametrize=True, hidden_size=8),
               False, False),
    "prompt": (lambda: prompt.prompt_tuning(3), False, False),
    "unipelt": (lambda: unipelt.unipelt(prefix_length=2, prefix_hidden_size=8,
                                                      reduction_factor=4), False, False),
}


#: The additive methods on the linen BERT (the parallel and multi-head adapters share Houlsby's
#: code path; tests/methods/test_adapters.py checks them against references); on the stacked decoder the ones whose code paths differ
#: there (per-layer adapter arrays sliced by the scan, IA3's stacked merge, prefix with GQA).
#: UniPELT (gated LoRA + prefix + adapter, each in this grid) has its own tests/methods/test_unipelt.py.
ADDITIVE_CASES = ([("linen_bert", m) for m in ADDITIVE
                   if m not in ("parallel", "multihead", "unipelt")]
                  + [("nnx_decoder_scan", m) for m in ("houlsby", "ia3", "prefix")])


@pytest.mark.parametrize("style_name,method_name", ADDITIVE_CASES)
def test_additive_contract(style_name, method_name, tmp_path):
    """Zero-initialised adapters (and IA3's ones) reproduce the base; a jitted train step lowers
    the loss and changes only the delta; mergeable methods merge exactly, the others refuse the
    materialised form; the saved config rebuilds the method and the checkpoint round trip is
    exact."""
    s, sites = _style(style_name)
    factory, exact_start, mergeable = ADDITIVE[method_name]
    method = factory()
    fact = jpeft.wrap(s.apply, method, sites)
    base_shape = jax.eval_shape(lambda p: s.apply(p, *s.args), s.params).shape
    target = np.random.default_rng(2).standard_normal(base_shape).astype(np.float32)

    def trim(out):               # prompt tuning lengthens the sequence: score the real tokens
        return out[:, out.shape[1] - base_shape[1]:] if out.shape != base_shape else out
    loss = lambda p, d, *_: jnp.mean((trim(fact(p, d, *s.args)) - target) ** 2)
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss, opt, donate=False, method=method)

    @jax.jit
    def checks(p, key):
        d0 = method.init(key, p, sites)
        d = _perturbed(d0, jax.random.fold_in(key, 1))
        outs = (s.apply(p, *s.args), fact(p, d0, *s.args), fact(p, d, *s.args))
        merged = (s.apply(method.merge(p, d, sites), *s.args),) if mergeable else ()

        def train(carry, i):
            dd, st = carry
            dd, st, m = step(p, dd, st, None, jax.random.key(i))
            return (dd, st), m["loss"]
        (trained, _), losses = jax.lax.scan(
            train, (d0, jpeft.init_opt_state(opt, d0, method=method)), jnp.arange(4))
        return outs, merged, losses, d0, trained
    outs, merged, losses, delta0, trained = checks(s.params, jax.random.key(1))
    base, zero, out = (np.asarray(o) for o in outs)
    scale = float(np.abs(base).max()) + 1.0
    if exact_start:
        np.testing.assert_allclose(zero, base, atol=1e-6 * scale, rtol=0)
    assert not np.allclose(trim(out), base, atol=1e-5 * scale)
    if mergeable:
        np.testing.assert_allclose(np.asarray(merged[0]), out, atol=2e-5 * scale, rtol=1e-4)
    else:
        assert method.merge is None
        with pytest.raises(ValueError, match="materialised"):
            jpeft.wrap(s.apply, method, sites, mode="materialised")(s.params, delta0, *s.args)
    assert float(losses[-1]) < float(losses[0]), losses
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained),
                                                         jax.tree.leaves(delta0)))

    # The saved config rebuilds the method; the checkpoint restores the delta bit for bit.
    checkpoint.save(tmp_path / "ck", trained, metadata={"config": method.config,
                                                        "sites": sites.to_json()})
    rebuilt = methods.from_config(method.config)
    assert rebuilt.config == method.config
    like = jax.eval_shape(lambda k, p: rebuilt.init(k, p, sites), jax.random.key(0), s.params)
    got = checkpoint.restore(tmp_path / "ck", like)
    restored = jpeft.wrap(s.apply, rebuilt, jpeft.Sites.from_json(got["metadata"]["sites"]))(
        s.params, got["delta"], *s.args)
    np.testing.assert_array_equal(np.asarray(restored),
                                  np.asarray(fact(s.params, trained, *s.args)))
