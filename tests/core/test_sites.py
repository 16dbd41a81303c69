"""Contraction sites found by data flow, and the data-flow backend that edits them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import zoo
from conftest import perturb
from jpeft.core import dataflow
from jpeft.core import sites as sites_lib


def _layouts(sites):
    return {"/".join(p): (c.kind, c.stack, c.contract, c.free) for p, c in sites.contractions.items()}


def test_layouts_of_every_weight_kind():
    """Dense, DenseGeneral (MHA), Einsum with a middle contracted axis, scan-stacked kernels and
    conv kernels, in their own axis numbering."""
    mha = zoo.build("linen_mha")
    got = _layouts(jpeft.probe(mha.apply, mha.params, *mha.args))
    assert got["params/attn/query/kernel"] == ("dot", (), (0,), (1, 2))     # [in, heads, hd]
    assert got["params/attn/out/kernel"] == ("dot", (), (0, 1), (2,))       # [heads, hd, out]
    assert got["params/up/kernel"] == ("dot", (), (0,), (1,))
    ein = zoo.build("linen_einsum")
    got = _layouts(jpeft.probe(ein.apply, ein.params, *ein.args))
    assert got["params/kv/kernel"] == ("dot", (), (2,), (0, 1, 3))          # "sndh": d contracted
    assert got["params/o/kernel"] == ("dot", (), (0, 1), (2,))
    scan = zoo.build("linen_scan_remat")
    got = _layouts(jpeft.probe(scan.apply, scan.params, *scan.args))
    assert got["params/layers/up/kernel"] == ("dot", (0,), (1,), (2,))      # [L, in, out]
    conv = zoo.build("linen_conv")
    got = _layouts(jpeft.probe(conv.apply, conv.params, *conv.args))
    assert got["params/conv1/kernel"] == ("conv", (), (0, 1, 2), (3,))      # [kh, kw, in, out]
    dec = zoo.build("nnx_decoder_scan")
    sites = jpeft.probe(dec.apply, dec.params, *dec.args)
    got = _layouts(sites)
    assert got["model/layers/self_attn/q_proj/kernel"] == ("dot", (0,), (1,), (2,))
    assert "model/layers/input_layernorm/scale" not in got
    assert sites.other_uses[("model", "embed_tokens", "embedding")]         # a lookup, no dot
    assert jpeft.Sites.from_json(sites.to_json()) == sites


def test_control_flow_and_custom_derivatives_are_followed():
    """A weight reaching its contraction through cond, while, a custom_jvp function, a nested jit
    and a transpose is still found and edited, and the edit equals the merged weight."""
    @jax.custom_jvp
    def through(w, x):
        return x @ w

    through.defjvp(lambda p, t: (through(*p), t[1] @ p[0] + p[1] @ t[0]))

    def apply(v, x):
        y = jax.lax.cond(x.sum() > 0, lambda x: x @ v["a"], lambda x: x @ v["a"] * 2.0, x)
        y = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ v["b"]), (0, y))[1]
        y = jax.jit(lambda w, y: jnp.einsum("bi,oi->bo", y, w.T))(v["c"], y)
        return through(v["d"], y)
    v = {k: jax.random.normal(jax.random.key(i), (4, 4)) / 2 for i, k in enumerate("abcd")}
    x = jnp.ones((3, 4))
    sites = jpeft.probe(apply, v, x)
    assert set(_layouts(sites)) == {"a", "b", "c", "d"}
    assert sites.contractions[("a",)].calls == 2 and sites.contractions[("b",)].calls == 1
    assert sites.contractions[("c",)].contract == (0,)          # w.T contracted over "i" = axis 0
    method = jpeft.lora(("a", "b", "c", "d"), rank=2)
    delta = perturb(method.init(jax.random.key(0), v, sites))
    got = jax.jit(jpeft.wrap(apply, method, sites))(v, delta, x)
    np.testing.assert_allclose(got, apply(method.merge(v, delta, sites), x), rtol=1e-5, atol=1e-5)


def test_edits_see_each_scan_iteration_and_their_own_slice():
    """Under scan the edit's factors are sliced with the weight; the call's index is the
    iteration and its key differs per iteration."""
    def apply(v, x):
        def body(h, w):
            return jnp.tanh(h @ w), None
        return jax.lax.scan(body, x, v["w"])[0]
    v = {"w": jax.random.normal(jax.random.key(0), (3, 4, 4))}
    x = jnp.ones((2, 4))
    sites = jpeft.probe(apply, v, x)
    assert sites.contractions[("w",)].stack == (0,)
    seen = []

    def fn(call, factors):
        seen.append((factors["t"].value.shape, factors["t"].axes, len(call.index)))
        return call.y + factors["t"].value.sum() + call.index[0].astype(call.y.dtype)
    t = jnp.arange(3.0)[:, None] * jnp.ones((3, 5))
    edit = sites_lib.ContractionEdit({"t": sites_lib.Factor(t, (0, None))}, fn)
    out = dataflow.call(apply, v, (x,), {}, edits={("w",): edit})
    assert seen == [((5,), (None,), 1)]

    def ref(v, x):                                  # the same edit written by hand
        h = x
        for i in range(3):
            h = jnp.tanh(h @ v["w"][i] + 5.0 * i + i)
        return h
    np.testing.assert_allclose(out, ref(v, x), rtol=1e-6)


def test_unreached_weights_are_errors_and_other_uses_get_the_edited_weight():
    """An edited weight the pass never uses is an error; one also used outside contractions
    (summed here) gets the edited weight there (exact, equal to the merged model), or an error
    naming the use when the method cannot form it."""
    def apply(v, x):
        return x @ v["w"] + v["w"].sum()          # the weight is also summed: a second use
    v = {"w": jnp.ones((3, 3)), "u": jnp.ones((3, 3))}
    x = jnp.ones((1, 3))
    sites = jpeft.probe(apply, v, x)
    assert sites.contractions[("w",)].other_uses == ("reduce_sum",)
    edit = sites_lib.ContractionEdit({}, lambda call, f: call.y)
    with pytest.raises(ValueError, match=r"never used in this forward pass: \['u'\]"):
        dataflow.call(apply, v, (x,), {}, edits={("u",): edit})
    with pytest.raises(ValueError, match=r"w is used by reduce_sum.*cannot form the edited"):
        dataflow.call(apply, v, (x,), {}, edits={("w",): edit})
    with pytest.raises(ValueError, match=r"lora: .*u: not used by the probed forward pass"):
        jpeft.lora(("u",)).init(jax.random.key(0), v, sites)
    method = jpeft.lora(("w",), rank=2)
    delta = perturb(method.init(jax.random.key(0), v, sites))
    got = jax.jit(jpeft.wrap(apply, method, sites))(v, delta, x)
    np.testing.assert_allclose(got, apply(method.merge(v, delta, sites), x), rtol=1e-5)
    g = jax.grad(lambda d: jpeft.wrap(apply, method, sites)(v, d, x).sum())(delta)
    g_ref = jax.grad(lambda d: apply(method.merge(v, d, sites), x).sum())(delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, g_ref)


def test_conflicting_layouts_are_reported():
    def apply(v, x):
        return x @ v["w"] + (x @ v["w"].T)          # one weight, contracted over both axes
    v = {"w": jnp.ones((3, 3))}
    sites = jpeft.probe(apply, v, jnp.ones((1, 3)))
    assert ("w",) in sites.conflicts
    with pytest.raises(ValueError, match="different layouts"):
        jpeft.lora(("w",)).init(jax.random.key(0), v, sites)


def test_all_linear_report_and_shape_errors():
    conv = zoo.build("linen_conv")
    sites = jpeft.probe(conv.apply, conv.params, *conv.args)
    with pytest.raises(ValueError, match=r"none can be adapted.*conv1/kernel: a conv contraction"
                                         r".*head/kernel: the output head"):
        jpeft.methods.lora.report(conv.params, sites)
    rep = jpeft.methods.lora.report(conv.params, sites, ("conv1", "head"))
    assert [p[-2] for p in rep.chosen] == ["conv1", "head"]
    with pytest.raises(ValueError, match=r"rank 9 is larger than the weight params/conv1/kernel of "
                                         r"shape \(3, 3, 3, 8\).*min\(27, 8\)"):
        jpeft.lora(("conv1",), rank=9).init(jax.random.key(0), conv.params, sites)


def test_all_linear_is_peft_rule_and_reports_what_it_leaves_out():
    """``"all-linear"``: linear layers only, as Hugging Face PEFT's rule: on a tied-embedding
    decoder the embedding (read by a lookup, and the tied output projection) and on an untied
    one the output head are left out, each reported with its reason; the forward pass then
    runs factored."""
    from flax import nnx
    from jpeft.models.llama import LlamaConfig, LlamaForCausalLM
    ids = np.random.default_rng(0).integers(1, 64, (2, 5)).astype(np.int32)
    for tied in (True, False):
        config = LlamaConfig.tiny(vocab_size=64, hidden_size=16, intermediate_size=24,
                                  num_attention_heads=2, num_key_value_heads=1,
                                  num_hidden_layers=1, tie_word_embeddings=tied)
        apply, params = jpeft.nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
        sites = jpeft.probe(apply, params, ids)
        rep = jpeft.methods.lora.report(params, sites)
        embed = ("model", "embed_tokens", "embedding")
        assert embed not in rep.chosen
        assert ("an embedding" if tied else "used by gather") in rep.skipped[embed]
        if not tied:
            assert "output head" in rep.skipped[("lm_head", "kernel")]
        assert len(rep.chosen) == 7                     # q, k, v, o, gate, up, down
        method = jpeft.lora("all-linear", rank=2)
        delta = perturb(method.init(jax.random.key(0), params, sites))
        np.testing.assert_allclose(jpeft.wrap(apply, method, sites)(params, delta, ids),
                                   apply(method.merge(params, delta, sites), ids),
                                   rtol=1e-4, atol=1e-4)


def test_all_linear_reaches_weights_indexed_in_a_loop():
    def apply(v, x):
        h = jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ v["layers"][i]), x)
        return h @ v["head"]
    v = {"layers": jnp.ones((3, 4, 4)), "head": jnp.ones((4, 2))}
    rep = jpeft.methods.lora.report(v, jpeft.probe(apply, v, jnp.ones((1, 4))))
    assert rep.chosen == [("layers",)] and ("head",) in rep.skipped


def test_named_targets_never_drop_silently():
    """A target reached only on another code path is an error at init saying what to probe
    with; a target of a list that matches nothing is an error even when the others match."""
    def apply(v, x, gated=False):
        h = x @ v["a"]["kernel"] + v["a"]["bias"]
        return h @ v["b"]["kernel"] if gated else h
    v = {"a": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))},
         "b": {"kernel": jnp.ones((3, 3))}}
    sites = jpeft.probe(apply, v, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"target module b cannot be adapted: b/kernel: not used "
                                         r"by the probed forward pass \(probe with inputs"):
        jpeft.lora(("a", "b"), rank=1).init(jax.random.key(0), v, sites)
    with pytest.raises(ValueError, match=r"targets \['c'\] match no leaf"):
        jpeft.lora(("a", "c"), rank=1).init(jax.random.key(0), v, sites)
    both = jpeft.probe(lambda v, x: apply(v, x, gated=True), v, jnp.ones((1, 3)))
    delta = jpeft.lora(("a", "b"), rank=1).init(jax.random.key(0), v, both)
    assert set(delta) == {"a", "b"}
