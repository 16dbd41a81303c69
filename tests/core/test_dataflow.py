"""The data-flow backend on the idioms of real LLM code: weights indexed in loops, reshaped,
sliced, broadcast, gathered per token (MoE), grouped (ragged dot), dequantized from integers,
inside custom-derivative functions, nested jits with shardings and calls jpeft does not enter.

Each case is exact or an error, never a quiet difference: LoRA's factored forward and its
gradients equal the same model run with ``W + s A B`` written by hand in the test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jpeft
from conftest import perturb
from jpeft.core import dataflow
from jpeft.core import sites as sites_lib

RANK, ALPHA = 2, 4.0
S = ALPHA / RANK


def _lora(apply, params, args, targets, merged, *, rtol=1e-5, atol=1e-5):
    """Probe, LoRA on ``targets``, a perturbed delta: the factored forward (jitted) and the
    gradient with respect to the delta equal ``apply(merged(params, delta), *args)`` and its
    gradient. Returns ``(sites, method, delta)``."""
    sites = jpeft.probe(apply, params, *args)
    method = jpeft.lora(targets, rank=RANK, alpha=ALPHA)
    delta = perturb(method.init(jax.random.key(0), params, sites))
    f = jpeft.wrap(apply, method, sites)
    got = jax.jit(f)(params, delta, *args)
    want = apply(merged(params, delta), *args)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
    g = jax.grad(lambda d: jnp.sum(jnp.sin(f(params, d, *args))))(delta)
    g_ref = jax.grad(lambda d: jnp.sum(jnp.sin(apply(merged(params, d), *args))))(delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)
    return sites, method, delta


def _key(i):
    return jax.random.key(i)


def _dw(d, spec="ir,ro->io"):
    return S * jnp.einsum(spec, d["lora_A"], d["lora_B"])


# --------------------------------------------------------------------------------------------
# Stacked weights indexed by a loop counter


@pytest.mark.parametrize("loop", ["fori", "while", "python"])
def test_stacked_weight_indexed_in_a_layer_loop(loop):
    """``w[i]`` inside ``fori_loop`` (a scan), ``while_loop`` (a trip count known only at run
    time) and a Python loop (static indices): factors ``[L, in, r]`` / ``[L, r, out]``, each
    layer its own slice."""
    n = 3

    def apply(v, x, steps):
        def layer(i, h):
            return jnp.tanh(h @ v["w"][i] + v["b"][i])
        if loop == "fori":
            return jax.lax.fori_loop(0, n, layer, x)
        if loop == "while":
            return jax.lax.fori_loop(0, steps, layer, x)
        for i in range(n):
            x = layer(i, x)
        return x
    v = {"w": jax.random.normal(_key(0), (n, 4, 4)) / 2, "b": jnp.zeros((n, 4))}
    x = jax.random.normal(_key(1), (2, 4))
    merged = lambda v, d: {**v, "w": v["w"] + _dw(d["w"], "lir,lro->lio")}
    sites, method, delta = _lora(apply, v, (x, n), ("w",), merged)
    c = sites.contractions[("w",)]
    assert (c.stack, c.contract, c.free, c.scanned) == ((0,), (1,), (2,), (0,))
    assert delta["w"]["lora_A"].shape == (n, 4, RANK)
    # layers_to_transform narrows the stacked axis; the other layers keep the base weight
    one = jpeft.lora(("w",), rank=RANK, alpha=ALPHA, layers_to_transform=[1])
    d1 = perturb(one.init(_key(0), v, sites))
    assert d1["w"]["lora_A"].shape == (1, 4, RANK)
    full = {"lora_A": jnp.zeros((n, 4, RANK)).at[1].set(d1["w"]["lora_A"][0]),
            "lora_B": jnp.zeros((n, RANK, 4)).at[1].set(d1["w"]["lora_B"][0])}
    np.testing.assert_allclose(jpeft.wrap(apply, one, sites)(v, d1, x, n),
                               apply(merged(v, {"w": full}), x, n), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Layout operations


def test_fused_qkv_split_and_reshaped_heads():
    """A fused ``[D, 3*N*H]`` weight split into q, k, v by slicing and each reshaped to heads
    ``[D, N, H]``: one pair of factors ``A [D, r]``, ``B [r, 3*N*H]``, sliced and reshaped with
    the weight (PEFT's LoRA on a fused projection)."""
    d, nh, h = 6, 2, 3

    def apply(v, x):
        q, k, val = jnp.split(v["qkv"], 3, axis=1)
        heads = [jnp.einsum("td,dnh->tnh", x, w.reshape(d, nh, h)) for w in (q, k, val)]
        att = jax.nn.softmax(jnp.einsum("tnh,snh->nts", heads[0], heads[1]), axis=-1)
        ctx = jnp.einsum("nts,snh->tnh", att, heads[2])
        return jnp.einsum("tnh,nhd->td", ctx, v["o"].reshape(nh, h, d))
    v = {"qkv": jax.random.normal(_key(0), (d, 3 * nh * h)) / 2,
         "o": jax.random.normal(_key(1), (nh * h, d)) / 2}
    x = jax.random.normal(_key(2), (5, d))
    merged = lambda v, dl: {"qkv": v["qkv"] + _dw(dl["qkv"]), "o": v["o"] + _dw(dl["o"])}
    sites, _, delta = _lora(apply, v, (x,), ("qkv", "o"), merged)
    assert sites.contractions[("qkv",)].calls == 3
    assert set(sites.contractions[("qkv",)].through) == {"reshape", "slice"}
    assert sites.contractions[("o",)].contract == (0,)        # [N*H, D] merged back from [N, H, D]
    assert delta["qkv"]["lora_B"].shape == (RANK, 3 * nh * h)


@pytest.mark.parametrize("perm, contract, free, merge", [
    ((1, 2, 0), (1,), (0, 2), "kr,rac->akc"),
    ((2, 0, 1), (2,), (0, 1), "kr,rab->abk")])
def test_transposed_three_axis_weight_keeps_its_axes(perm, contract, free, merge):
    """``jnp.transpose(W, perm)`` of a ``[4, 5, 6]`` weight before the contraction: the factors
    follow the weight's own axes (``A`` over the contracted one, ``B`` over the other two in the
    weight's order), and the forward and gradients equal ``W + s A . B`` put back by hand."""
    def apply(v, x):
        return jnp.einsum("tk,kio->tio", x, jnp.transpose(v["w"], perm))
    v = {"w": jax.random.normal(_key(0), (4, 5, 6))}
    x = jax.random.normal(_key(1), (3, v["w"].shape[contract[0]]))
    merged = lambda v, d: {"w": v["w"] + _dw(d["w"], merge)}
    sites, _, delta = _lora(apply, v, (x,), ("w",), merged)
    c = sites.contractions[("w",)]
    assert (c.contract, c.free) == (contract, free)
    assert delta["w"]["lora_B"].shape == (RANK, *(v["w"].shape[i] for i in free))


def test_index_broadcast_reverse_and_expand():
    """``W[0]`` of a ``[1, in, out]`` weight, ``broadcast_to`` over a batch axis and a reversed
    weight each reach their contraction with the factors taken the same way."""
    def apply(v, x):
        a = x @ v["one"][0]
        b = jnp.einsum("bi,bio->bo", x, jnp.broadcast_to(v["bc"], (x.shape[0], 4, 4)))
        c = x @ v["rv"][::-1, :]
        e = jnp.einsum("bi,zio->bzo", x, v["ex"][None])[:, 0]
        return a + b + c + e
    v = {k: jax.random.normal(_key(i), s) for i, (k, s) in
         enumerate([("one", (1, 4, 4)), ("bc", (4, 4)), ("rv", (4, 4)), ("ex", (4, 4))])}
    x = jax.random.normal(_key(9), (3, 4))
    merged = lambda v, d: {"one": v["one"] + _dw(d["one"], "lir,lro->lio"),
                           "bc": v["bc"] + _dw(d["bc"]), "rv": v["rv"] + _dw(d["rv"]),
                           "ex": v["ex"] + _dw(d["ex"])}
    sites, _, _ = _lora(apply, v, (x,), ("one", "bc", "rv", "ex"), merged)
    assert sites.contractions[("one",)].stack == (0,)


def test_stop_gradient_stops_the_delta_at_that_use_as_it_would_the_merged_weight():
    def apply(v, x):
        return x @ v["w"] + x @ jax.lax.stop_gradient(v["w"]) * 0.5
    v = {"w": jax.random.normal(_key(0), (4, 4))}
    x = jax.random.normal(_key(1), (3, 4))
    _lora(apply, v, (x,), ("w",), lambda v, d: {"w": v["w"] + _dw(d["w"])})


def test_reshape_mixing_contracted_and_output_axes_is_a_conflict():
    def apply(v, x):
        return x @ v["w"].reshape(4, 4)             # [2, 8] -> [4, 4]: axes cut across
    v = {"w": jnp.ones((2, 8))}
    sites = jpeft.probe(apply, v, jnp.ones((1, 4)))
    assert ("w",) in sites.conflicts and "reshape" in sites.conflicts[("w",)]
    with pytest.raises(ValueError, match="mix weight axes"):
        jpeft.lora(("w",), rank=1).init(_key(0), v, sites)


def test_scan_over_a_reshaped_stack():
    """A stack stored flat ``[L*in, out]``, reshaped to ``[L, in, out]`` and scanned: LoRA of the
    stored matrix (``A [L*in, r]``, ``B [r, out]``), its factors reshaped with the weight and
    ``A`` sliced per iteration."""
    def apply(v, x):
        w = v["w"].reshape(3, 4, 4)
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]
    v = {"w": jax.random.normal(_key(0), (12, 4)) / 2}
    x = jax.random.normal(_key(1), (2, 4))
    sites, _, delta = _lora(apply, v, (x,), ("w",), lambda v, d: {"w": v["w"] + _dw(d["w"])})
    assert delta["w"]["lora_A"].shape == (12, RANK)


# --------------------------------------------------------------------------------------------
# Mixtures of experts


def test_moe_experts_gathered_per_token_and_einsum_over_experts():
    """Expert weights ``[E, in, out]`` read as ``w[expert_of_token]`` (a gather) and through an
    einsum batched over the expert axis after dispatch (GShard's form): per-expert factors
    ``[E, in, r]``, routed with the tokens."""
    e, d, f = 3, 4, 5

    def apply(v, x):
        logits = x @ v["router"]
        top = jnp.argmax(logits, axis=-1)
        gathered = jnp.einsum("td,tdf->tf", x, v["up"][top])
        dispatch = jax.nn.one_hot(top, e)
        per_expert = jnp.einsum("etd,edf->etf", jnp.einsum("te,td->etd", dispatch, x), v["gate"])
        mixed = jnp.einsum("etf,te->tf", per_expert, dispatch)
        return jnp.tanh(gathered) * mixed
    v = {"router": jax.random.normal(_key(0), (d, e)),
         "up": jax.random.normal(_key(1), (e, d, f)) / 2,
         "gate": jax.random.normal(_key(2), (e, d, f)) / 2}
    x = jax.random.normal(_key(3), (7, d))
    merged = lambda v, dl: {**v, "up": v["up"] + _dw(dl["up"], "eir,ero->eio"),
                            "gate": v["gate"] + _dw(dl["gate"], "eir,ero->eio")}
    sites, _, delta = _lora(apply, v, (x,), ("up", "gate"), merged)
    assert sites.contractions[("up",)].stack == (0,)
    assert sites.contractions[("up",)].through == ("gather",)
    assert delta["up"]["lora_A"].shape == (e, d, RANK)


def test_moe_ragged_dot():
    """``lax.ragged_dot`` of tokens sorted by expert against ``[E, in, out]``: each group of rows
    meets its own expert's factors."""
    e, d, f = 3, 4, 5
    sizes = jnp.array([2, 0, 4], jnp.int32)

    def apply(v, x):
        return jax.lax.ragged_dot(x, v["w"], sizes) + x.sum(-1, keepdims=True)   # not a head
    v = {"w": jax.random.normal(_key(0), (e, d, f))}
    x = jax.random.normal(_key(1), (6, d))
    merged = lambda v, dl: {"w": v["w"] + _dw(dl["w"], "eir,ero->eio")}
    sites, _, _ = _lora(apply, v, (x,), ("w",), merged)
    c = sites.contractions[("w",)]
    assert (c.kind, c.stack, c.contract, c.free) == ("ragged", (0,), (1,), (2,))
    rep = jpeft.methods.lora.report(v, sites)
    assert rep.chosen == [("w",)]


# --------------------------------------------------------------------------------------------
# Integer weights


def test_int8_weight_dequantized_before_the_product():
    """``x @ (q.astype(f32) * scale)``: the product is followed as the weight ``q`` (LoRA adds
    ``s x A B`` to the dequantized product); ``(x @ q) * scale`` would put the edit on the codes,
    and is refused naming the way out."""
    q = jax.random.randint(_key(0), (4, 5), -127, 128).astype(jnp.int8)
    v = {"q": q, "scale": jnp.linspace(0.01, 0.02, 5)}
    x = jax.random.normal(_key(1), (3, 4))

    def apply(v, x):
        return x @ (v["q"].astype(jnp.float32) * v["scale"])
    sites = jpeft.probe(apply, v, x)
    assert sites.contractions[("q",)].dtype == "float32"
    method = jpeft.lora(("q",), rank=RANK, alpha=ALPHA)
    delta = perturb(method.init(_key(2), v, sites))
    assert delta["q"]["lora_A"].dtype == jnp.float32
    want = apply(v, x) + S * x @ delta["q"]["lora_A"] @ delta["q"]["lora_B"]
    np.testing.assert_allclose(jax.jit(jpeft.wrap(apply, method, sites))(v, delta, x), want,
                               rtol=1e-5, atol=1e-5)

    def after(v, x):
        return (x @ v["q"].astype(jnp.float32)) * v["scale"]
    sites2 = jpeft.probe(after, v, x)
    assert sites2.contractions[("q",)].dtype == "int8"
    with pytest.raises(ValueError, match=r"q: an int8 weight contracted as it is"):
        method.init(_key(2), v, sites2)
    with pytest.raises(ValueError, match=r"q is an int8 weight.*integer codes.*jpeft.weight"):
        jpeft.wrap(after, method, sites2)(v, delta, x)


# --------------------------------------------------------------------------------------------
# Custom derivatives, nested jits, calls jpeft does not enter


def _odd_rule():
    """``x @ w`` whose custom VJP scales the weight's gradient by 3 (so dropping the rule
    shows)."""
    @jax.custom_vjp
    def mm(x, w):
        return x @ w
    mm.defvjp(lambda x, w: (x @ w, (x, w)), lambda r, g: (g @ r[1].T, 3.0 * r[0].T @ g))
    return mm


def test_custom_vjp_keeps_its_rule():
    """A weight entering a ``custom_vjp`` kernel: the function is bound with its own rule and
    the edited weight (forward and gradients equal the merged model's, rule included)."""
    mm = _odd_rule()

    def apply(v, x):
        return mm(jnp.tanh(x @ v["a"]), v["w"])
    v = {"a": jax.random.normal(_key(0), (4, 4)), "w": jax.random.normal(_key(1), (4, 4))}
    x = jax.random.normal(_key(2), (3, 4))
    merged = lambda v, d: {"a": v["a"] + _dw(d["a"]), "w": v["w"] + _dw(d["w"])}
    sites, _, _ = _lora(apply, v, (x,), ("a", "w"), merged)
    assert "custom_vjp_call" in sites.contractions[("w",)].other_uses
    assert not sites.contractions[("a",)].other_uses


def test_custom_jvp_keeps_its_rule():
    @jax.custom_jvp
    def mm(x, w):
        return x @ w
    mm.defjvp(lambda p, t: (mm(*p), t[0] @ p[1] + 2.0 * p[0] @ t[1]))

    def apply(v, x):
        return mm(x, v["w"])
    v = {"w": jax.random.normal(_key(1), (4, 4))}
    x = jax.random.normal(_key(2), (3, 4))
    _lora(apply, v, (x,), ("w",), lambda v, d: {"w": v["w"] + _dw(d["w"])})


def test_marks_inside_custom_functions_are_refused_unless_declared_same_derivative():
    @jax.custom_vjp
    def f(x):
        return jpeft.core.marks.mark(jnp.sin(x), "inner", "out")
    f.defvjp(lambda x: (f(x), x), lambda x, g: (g * jnp.cos(x),))

    @jax.custom_vjp
    def h(x):
        return dataflow.same_derivative(jpeft.core.marks.mark(jnp.sin(x), "inner2", "out"))
    h.defvjp(lambda x: (h(x), x), lambda x, g: (g * jnp.cos(x),))

    def edit(key):
        return sites_lib.MarkEdit({}, lambda call, a: call.value * 2.0)
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match=r"inner:out is inside a custom_vjp_call function.*"
                                         r"same_derivative"):
        dataflow.call(lambda p, x: f(x), {}, (x,), {}, edits={},
                      marks={(("inner",), "out"): edit(0)})
    out = dataflow.call(lambda p, x: h(x), {}, (x,), {}, edits={},
                        marks={(("inner2",), "out"): edit(0)})
    np.testing.assert_allclose(out, 2 * jnp.sin(x), rtol=1e-6)


def test_nested_jit_keeps_its_out_shardings():
    """A nested ``jit(..., out_shardings=...)`` that a weight enters is inlined with its
    shardings kept: the edited output is placed as the model's own."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 host devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    out_s = NamedSharding(mesh, P("data", "model"))
    inner = jax.jit(lambda x, w: x @ w, out_shardings=out_s)

    def apply(v, x):
        return inner(x, v["w"])
    v = {"w": jax.random.normal(_key(0), (8, 8))}
    x = jax.random.normal(_key(1), (4, 8))
    sites, method, delta = _lora(apply, v, (x,), ("w",), lambda v, d: {"w": v["w"] + _dw(d["w"])})
    got = jax.jit(jpeft.wrap(apply, method, sites))(v, delta, x)
    assert got.sharding == jax.jit(apply)(v, x).sharding == out_s
    text = jax.jit(jpeft.wrap(apply, method, sites)).lower(v, delta, x).as_text()
    assert 'sharding_constraint' in text and '[{"data"}, {"model"}]' in text


def test_weight_passed_into_shard_map_gets_the_edited_weight():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 host devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("model",))

    def apply(v, x):
        f = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P(), P(None, "model")),
                          out_specs=P(None, "model"))
        return f(x, v["w"])
    v = {"w": jax.random.normal(_key(0), (4, 8))}
    x = jax.random.normal(_key(1), (3, 4))
    sites, _, _ = _lora(apply, v, (x,), ("w",), lambda v, d: {"w": v["w"] + _dw(d["w"])})
    assert sites.contractions[("w",)].other_uses == ("shard_map",)


def test_a_method_that_cannot_form_the_edited_weight_is_refused_where_it_cannot_follow():
    """FAR's factors live in the weight's own column layout: on a reshaped weight it is an
    error naming the weight and the reshape (materialised mode stays exact)."""
    def apply(v, x):
        return jnp.einsum("bd,dnh->bnh", x, v["w"].reshape(4, 2, 3)).reshape(x.shape[0], 6)
    v = {"w": jax.random.normal(_key(0), (4, 6))}
    x = jax.random.normal(_key(1), (2, 4))
    sites = jpeft.probe(apply, v, x)
    method = jpeft.far({"w": np.array([0, 3])}, train_bias=False)
    delta = perturb(method.init(_key(0), v, sites))
    with pytest.raises(ValueError, match=r"w is used by dot \(through reshape\).*cannot form"):
        jpeft.wrap(apply, method, sites)(v, delta, x)
    got = jpeft.wrap(apply, method, sites, mode="materialised")(v, delta, x)
    np.testing.assert_allclose(got, apply(method.merge(v, delta, sites), x), rtol=1e-6)


def test_traces_are_kept_and_shared_with_the_probe():
    """The model is traced once per structure, shapes and static arguments: a wrapped model
    called (eagerly or under jit) with the shapes it was probed with is not traced again."""
    traced = []

    def apply(v, x, scale=1.0):
        traced.append(x.shape)
        return jnp.tanh(x @ v["w"]) * scale
    v = {"w": jax.random.normal(_key(0), (4, 4))}
    x = jnp.ones((2, 4))
    sites = jpeft.probe(apply, v, x)
    assert traced == [(2, 4)]
    method = jpeft.lora(("w",), rank=2)
    delta = perturb(method.init(_key(1), v, sites))
    f = jpeft.wrap(apply, method, sites)
    f(v, delta, x)
    jax.jit(f)(v, delta, x)
    jax.jit(jpeft.wrap(apply, method, sites))(v, delta, x)
    assert traced == [(2, 4)]
    f(v, delta, jnp.ones((3, 4)))                     # another shape: traced once more
    f(v, delta, x, scale=2.0)                         # another static argument
    assert traced == [(2, 4), (3, 4), (2, 4)]
    np.testing.assert_allclose(f(v, delta, x, scale=2.0), 2.0 * f(v, delta, x), rtol=1e-6)


def test_unedited_runs_are_staged_as_shared_segments_with_the_same_program(monkeypatch):
    """While staging, runs of equations no edit touches are bound as one inlined ``jit`` each
    (one linearization per run, cached by JAX), shared by every layer of the same structure;
    the staged program holds the same equations as binding them one by one, and eager calls
    bind op by op as before."""
    def layer(x, w):
        h = x @ w
        return x + jax.nn.gelu(h) * jnp.tanh(h) / (1.0 + jnp.abs(h))

    def apply(v, x):
        for i in range(3):
            x = layer(x, v[f"w{i}"])
        return jnp.sum(jnp.cos(x) ** 2)

    v = {f"w{i}": jax.random.normal(_key(i), (8, 8)) / 3 for i in range(3)}
    x = jax.random.normal(_key(9), (4, 8))
    sites = jpeft.probe(apply, v, x)
    method = jpeft.lora(("w0", "w1", "w2"), rank=2)
    delta = perturb(method.init(_key(1), v, sites))
    f = jpeft.wrap(apply, method, sites)
    loss = lambda d: f(v, d, x)

    def program():
        counts = {}
        for eqn in jax.make_jaxpr(jax.grad(loss))(delta).jaxpr.eqns:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        return counts

    dataflow._SEGMENTS.clear()
    dataflow._SEGMENT_FNS.clear()
    segmented = program()
    runs = [k for k in dataflow._SEGMENTS if k[1] != "last uses"]
    assert len(runs) >= 3
    assert len(dataflow._SEGMENT_FNS) < len(runs)          # the layers share their runs' function
    g = jax.jit(jax.grad(loss))(delta)
    monkeypatch.setattr(dataflow, "MIN_SEGMENT", 10 ** 9)  # every equation on its own
    assert program() == segmented
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 jax.jit(jax.grad(loss))(delta), g)
    monkeypatch.undo()
    dataflow._SEGMENTS.clear()
    eager = f(v, delta, x)
    assert not [k for k in dataflow._SEGMENTS if k[1] != "last uses"]   # eager: op by op
    np.testing.assert_allclose(eager, jax.jit(f)(v, delta, x), rtol=1e-6)
