"""Marks: activation sites (module inputs/outputs, attention and FFN hook points) found and edited
by the data-flow backend, on linen, scanned linen and NNX models, against independent references
(flax's own method interception, hand-unrolled layers, merged weights)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
import zoo
from jpeft.core import marks as marks_lib
from jpeft.core import method as method_lib
from jpeft.core import sites as sites_lib


def _method(edits_fn, *, name="probe_edit", merge=None):
    """A minimal method whose forward change is ``edits_fn(delta) -> {key: MarkEdit}``."""
    return method_lib.Method(
        name=name, init=lambda key, params, sites=None: {}, merge=merge, unmerge=None,
        edits=lambda params, delta, sites, ctx: sites_lib.Edits(params, {}, edits_fn(delta)),
        shardings=lambda ps, d, sites=None: d, labels=method_lib.constant_labels(name), config={})


def test_linen_module_marks_and_parallel_edit_match_flax_interception():
    """A parallel adapter on flax's own attention module (``out += tanh(in @ W)``, reading the
    module's input at its output) equals the same change made by ``nn.intercept_methods``."""
    s = zoo.build("linen_mha")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    key_in, key_out = (("attn",), "in"), (("attn",), "out")
    assert sites.marks[key_in].shape == sites.marks[key_out].shape == (2, 5, 16)
    assert {m.kind for m in sites.marks.values()} == {"in", "out"}
    w = jax.random.normal(jax.random.key(3), (16, 16)) * 0.3

    def fn(call, arrays):
        return call.value + jnp.tanh(call.seen[key_in] @ arrays["w"])
    method = _method(lambda d: {key_out: sites_lib.MarkEdit({"w": d["w"]}, fn)})
    got = jax.jit(jpeft.wrap(s.apply, method, sites))(s.params, {"w": w}, *s.args)

    def reference(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.path == ("attn",) and context.method_name == "__call__":
            out = out + jnp.tanh(args[0] @ w)
        return out
    with nn.intercept_methods(reference):
        want = s.apply(s.params, *s.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(want, s.apply(s.params, *s.args))
    # the gradient reaches the edit's array
    g = jax.grad(lambda d: jpeft.wrap(s.apply, method, sites)(s.params, d, *s.args).sum())(
        {"w": w})
    assert float(jnp.abs(g["w"]).sum()) > 0


def test_scanned_marks_take_one_slice_per_layer():
    """Per-layer arrays ``[L, F]`` added at ``layers/up:out`` under ``nn.scan(nn.remat(...))``
    equal the hand-unrolled stack with each layer's own slice added."""
    s = zoo.build("linen_scan_remat")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    key = (("layers", "up"), "out")
    assert sites.marks[key].scanned == (3,)
    a = jax.random.normal(jax.random.key(4), (3, 32))
    method = _method(lambda d: {key: sites_lib.MarkEdit(
        {"a": d["a"]}, lambda call, arr: call.value + arr["a"])})
    got = jax.jit(jpeft.wrap(s.apply, method, sites))(s.params, {"a": a}, *s.args)

    p = s.params["params"]
    block = zoo._ScanBlock()
    x = s.args[0]
    for layer in range(3):
        def add(next_fun, args, kwargs, context, layer=layer):
            out = next_fun(*args, **kwargs)
            if context.module.path[-1:] == ("up",) and context.method_name == "__call__":
                out = out + a[layer]
            return out
        with nn.intercept_methods(add):
            x, _ = block.apply({"params": jax.tree.map(lambda w: w[layer], p["layers"])}, x, None)
    want = nn.Dense(3).apply({"params": p["head"]}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    bad = _method(lambda d: {key: sites_lib.MarkEdit({"a": d["a"][:2]},
                                                     lambda call, arr: call.value + arr["a"])})
    with pytest.raises(ValueError, match=r"scan of length 3.*leading axis"):
        jpeft.wrap(s.apply, bad, sites)(s.params, {"a": a}, *s.args)


def test_nnx_decoder_hook_points_scanned_equal_merged_weights():
    """Scaling the SwiGLU hidden activation per layer (``mlp:hidden * l[L, F]``, IA3's FFN
    vector) on the ``nnx.scan``-stacked decoder equals the plain model with the rows of each
    layer's ``down_proj`` kernel scaled by ``l``: ``(h * l) W = h (diag(l) W)``."""
    s = zoo.build("nnx_decoder_scan")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    keys = {m.kind: m.key for m in sites.marks.values() if m.scope[-1:] == ("self_attn",)}
    assert set(keys) >= {"query", "keys", "values", "mask", "lse", "context", "in", "out"}
    assert sites.marks[keys["lse"]].shape == (2, 6, 4)                       # [B, T, N]
    hidden = sites_lib.select_marks(sites, r".*mlp", "hidden", what="test")
    assert [m.scanned for m in hidden] == [(2,)]
    scale = 1.0 + 0.5 * jax.random.normal(jax.random.key(5), (2, 48))
    method = _method(lambda d: {hidden[0].key: sites_lib.MarkEdit(
        {"l": d["l"]}, lambda call, arr: call.value * arr["l"])})
    got = jax.jit(jpeft.wrap(s.apply, method, sites))(s.params, {"l": scale}, *s.args)
    params = jax.tree.map(lambda x: x, s.params)
    down = params["model"]["layers"]["mlp"]["down_proj"]
    down["kernel"] = down["kernel"] * scale[:, :, None]
    want = s.apply(params, *s.args)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    assert not np.allclose(want, s.apply(s.params, *s.args), atol=1e-3)


def test_marks_cost_nothing_and_identity_edits_change_nothing():
    s = zoo.build("linen_bert")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    kinds = {m.kind for m in sites.marks.values()}
    assert {"query", "keys", "values", "mask", "scores", "context", "hidden",
            "embeddings"} <= kinds
    base = jax.jit(s.apply)(s.params, *s.args)
    every = {k: sites_lib.MarkEdit({}, lambda call, arr: call.value) for k in sites.marks
             if k[1] not in marks_lib.READ_ONLY}
    out = jax.jit(jpeft.wrap(s.apply, _method(lambda d: every), sites))(s.params, {}, *s.args)
    np.testing.assert_array_equal(out, base)
    # the sites (marks included) survive a JSON round trip
    assert sites_lib.Sites.from_json(sites.to_json()) == sites


def test_seen_marks_from_outside_a_scan_are_visible_inside():
    """An edit inside the scanned stack reads a mark met before the scan (the model input)."""
    s = zoo.build("linen_scan_remat")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    top_in = ((), "in")
    seen_inside = {}

    def fn(call, arrays):
        seen_inside["keys"] = set(call.seen)
        return call.value + 0.0 * call.seen[top_in].sum()
    method = _method(lambda d: {(("layers", "down"), "out"): sites_lib.MarkEdit({}, fn)})
    out = jpeft.wrap(s.apply, method, sites)(s.params, {}, *s.args)
    np.testing.assert_allclose(out, s.apply(s.params, *s.args), rtol=1e-6)
    assert top_in in seen_inside["keys"] and (("layers", "up"), "out") in seen_inside["keys"]


def test_mark_errors_name_the_problem():
    s = zoo.build("linen_mha")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    ghost = _method(lambda d: {(("nope",), "out"): sites_lib.MarkEdit({}, lambda c, a: c.value)})
    with pytest.raises(ValueError, match=r"never met.*nope:out"):
        jpeft.wrap(s.apply, ghost, sites)(s.params, {}, *s.args)
    with pytest.raises(ValueError, match=r"materialised.*changes activations.*attn:out"):
        jpeft.wrap(s.apply, _method(lambda d: {(("attn",), "out"): sites_lib.MarkEdit(
            {}, lambda c, a: c.value)}), sites, mode="materialised")(s.params, {}, *s.args)
    with pytest.raises(ValueError, match=r"no keys sites.*kinds \['in', 'out'\]"):
        sites_lib.select_marks(sites, None, "keys", what="prefix")
    with pytest.raises(ValueError, match=r"no out site matches.*e.g."):
        sites_lib.select_marks(sites, ("missing",), "out", what="adapter")
    wrong_shape = _method(lambda d: {(("attn",), "out"): sites_lib.MarkEdit(
        {}, lambda c, a: c.value[..., :3])})
    with pytest.raises(ValueError, match=r"attn:out returned shape"):
        jpeft.wrap(s.apply, wrong_shape, sites)(s.params, {}, *s.args)
    # a read-only hook point (the decoder's attention log-normaliser) refuses an edit
    d = zoo.build("nnx_decoder_scan")
    d_sites = jpeft.probe(d.apply, d.params, *d.args)
    lse = next(k for k in d_sites.marks if k[1] == "lse")
    edit_lse = _method(lambda _: {lse: sites_lib.MarkEdit({}, lambda c, a: c.value + 1.0)})
    with pytest.raises(ValueError, match=r"read-only hook points.*change nothing"):
        jpeft.wrap(d.apply, edit_lse, d_sites)(d.params, {}, *d.args)


def test_composed_edits_of_one_mark_apply_in_order():
    s = zoo.build("linen_mha")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    key = (("up",), "out")
    add = _method(lambda d: {key: sites_lib.MarkEdit({}, lambda c, a: c.value + 1.0)}, name="a")
    mul = _method(lambda d: {key: sites_lib.MarkEdit({}, lambda c, a: c.value * 2.0)}, name="m")
    both = jpeft.compose(a=add, m=mul)
    got = jpeft.wrap(s.apply, both, sites)(s.params, {"a": {}, "m": {}}, *s.args)

    def reference(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        return (out + 1.0) * 2.0 if context.module.path == ("up",) else out
    with nn.intercept_methods(reference):
        want = s.apply(s.params, *s.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ["seq_par", "par_seq"])
def test_sequential_and_parallel_adapters_on_one_mark_see_each_others_edits(order):
    """A sequential adapter (``v + relu(v W1) W2``, reading the mark's value) and a parallel one
    (``v + tanh(x Wp)``, reading the sublayer's input) composed on one output mark: the later
    part sees the value the earlier part left, in composition order, against ``nn.intercept``."""
    s = zoo.build("linen_mha")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    key_in, key_out = (("attn",), "in"), (("attn",), "out")
    ks = jax.random.split(jax.random.key(7), 3)
    w1, w2, wp = (jax.random.normal(k, (16, 16)) * 0.4 for k in ks)
    seq_fn = lambda v: v + jax.nn.relu(v @ w1) @ w2
    par_fn = lambda v, x: v + jnp.tanh(x @ wp)
    seq = _method(lambda d: {key_out: sites_lib.MarkEdit(
        {"w1": d["w1"], "w2": d["w2"]},
        lambda c, a: c.value + jax.nn.relu(c.value @ a["w1"]) @ a["w2"])}, name="seq")
    par = _method(lambda d: {key_out: sites_lib.MarkEdit(
        {"wp": d["wp"]}, lambda c, a: c.value + jnp.tanh(c.seen[key_in] @ a["wp"]))},
        name="par")
    parts = {"seq": seq, "par": par}
    names = order.split("_")
    method = jpeft.compose(**{n: parts[n] for n in names})
    delta = {"seq": {"w1": w1, "w2": w2}, "par": {"wp": wp}}
    got = jax.jit(jpeft.wrap(s.apply, method, sites))(s.params, {n: delta[n] for n in names},
                                                       *s.args)

    def reference(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.path == ("attn",) and context.method_name == "__call__":
            for n in names:
                out = seq_fn(out) if n == "seq" else par_fn(out, args[0])
        return out
    with nn.intercept_methods(reference):
        want = s.apply(s.params, *s.args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_explicit_marks_in_raw_jax_and_foreign_names():
    """Raw JAX code marks its own values (``marks.mark``) or already names them with
    ``checkpoint_name`` (kind ``"named"``)."""
    from jax.ad_checkpoint import checkpoint_name

    def apply(p, x):
        h = checkpoint_name(x @ p["w1"], "mlp_hidden")
        return marks_lib.mark(jax.nn.relu(h), "block", "hidden") @ p["w2"]
    p = {"w1": jnp.ones((4, 8)) / 4, "w2": jnp.ones((8, 2))}
    x = jnp.arange(12.0).reshape(3, 4)
    sites = jpeft.probe(apply, p, x)
    assert set(sites.marks) == {(("mlp_hidden",), "named"), (("block",), "hidden")}
    method = _method(lambda d: {(("mlp_hidden",), "named"): sites_lib.MarkEdit(
        {}, lambda c, a: -c.value)})
    out = jpeft.wrap(apply, method, sites)(p, {}, x)
    np.testing.assert_allclose(out, jax.nn.relu(-(x @ p["w1"])) @ p["w2"])


def test_nnx_marks_do_not_touch_the_users_module():
    model = zoo._NNXBlock(nnx.Rngs(0))
    apply, params = jpeft.nnx.split(model)
    x = jnp.ones((2, 5, 16))
    sites = jpeft.probe(apply, params, x)
    assert (("attn",), "out") in sites.marks and (("up",), "in") in sites.marks
    assert type(model.up) is nnx.Linear and not hasattr(model.up, "_jpeft_scope")
    np.testing.assert_allclose(apply(params, x), model(x), rtol=1e-6)
