"""``jpeft.nnx.split``: NNX models as pure functions of their parameters and state.

References are independent of ``apply``: the NNX module's own eager call (or ``nnx.grad``) on a
clone made with ``nnx.clone``, its variables read directly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from conftest import perturb
from jpeft.core import marks as marks_lib


class _Net(nnx.Module):
    """Linear -> BatchNorm (train mode) -> relu -> Dropout (stored Rngs) -> Linear."""

    def __init__(self, seed=0):
        rngs = nnx.Rngs(seed)
        self.up = nnx.Linear(3, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, use_running_average=False, momentum=0.9, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=seed + 1))
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.drop(jax.nn.relu(self.bn(self.up(x)))))


def _x(seed=0, n=4):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, 3)), jnp.float32)


def _raw(v):
    """A variable's value as a host array (a PRNG key as its key data)."""
    if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
        v = jax.random.key_data(v)
    return np.asarray(v)


def _module_state(m: _Net) -> dict:
    """The state of a ``_Net`` read off its variables, in ``jpeft.nnx.state``'s layout."""
    return {"bn": {"mean": _raw(m.bn.mean[...]), "var": _raw(m.bn.var[...])},
            "drop": {"rngs": {"count": _raw(m.drop.rngs.count[...]),
                              "key": _raw(m.drop.rngs.key[...])}}}


def _assert_state_equal(got, want):
    got = jax.tree.map(_raw, got)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)


def _snapshot(model) -> dict:
    """Every variable of ``model`` by path, with its type and value (host copies)."""
    return {p: (type(v), _raw(v.get_raw_value()))
            for p, v in nnx.to_flat_state(nnx.state(model))}


def test_split_round_trip():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    apply, params = jpeft.nnx.split(model)
    x = jnp.ones((1, 3))
    assert set(params) == {"kernel", "bias"} and isinstance(params["kernel"], jax.Array)
    np.testing.assert_array_equal(apply(params, x), model(x))
    doubled = jax.tree.map(lambda a: 2 * a, params)
    np.testing.assert_allclose(apply(doubled, x), 2 * model(x), rtol=1e-6)
    np.testing.assert_array_equal(model.kernel[...], params["kernel"])    # model untouched
    # a model without other state: the state is {} and comes back as {}
    assert jpeft.nnx.state(model) == {}
    out, st = apply(params, x, state={})
    assert st == {}
    np.testing.assert_array_equal(out, model(x))
    # integer keys (nnx.List) may come back as strings, as from a checkpoint
    seq = nnx.List([nnx.Linear(3, 3, rngs=nnx.Rngs(1)), nnx.Linear(3, 2, rngs=nnx.Rngs(2))])
    apply2, p2 = jpeft.nnx.split(seq, method=lambda m, x: m[1](m[0](x)))
    restored = {str(k): v for k, v in p2.items()}
    np.testing.assert_array_equal(apply2(restored, x), seq[1](seq[0](x)))


def test_train_mode_state_threads_like_the_module_itself_under_jit():
    """BatchNorm's running statistics and Dropout's RNG count, carried through two jitted calls
    of ``apply``, equal the module's own two eager calls on a clone, and so do the outputs
    (dropout masks included)."""
    model = _Net()
    ref = nnx.clone(model)
    apply, params = jpeft.nnx.split(model)
    state = jpeft.nnx.state(model)
    _assert_state_equal(state, _module_state(ref))
    f = jax.jit(apply)
    for step in range(2):
        x = _x(step)
        out, state = f(params, x, state=state)
        want = ref(x)
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
        _assert_state_equal(state, _module_state(ref))
    assert int(state["drop"]["rngs"]["count"]) == 2
    assert not np.allclose(state["bn"]["mean"], 0.0)
    # the masks differ from step to step, as the module's own do
    out_a, s1 = f(params, _x(0), state=jpeft.nnx.state(model))
    out_b, _ = f(params, _x(0), state=s1)
    assert not np.allclose(out_a, out_b)


def test_changed_state_without_state_raises_naming_the_variables():
    model = _Net()
    apply, params = jpeft.nnx.split(model)
    x = _x()
    match = (r"changes its non-parameter state: bn/mean \(BatchStat\), bn/var \(BatchStat\), "
             r"drop/rngs/count \(RngCount\).*state=state.*model\.eval\(\)")
    with pytest.raises(ValueError, match=match):
        apply(params, x)
    with pytest.raises(ValueError, match=match):
        jax.jit(apply)(params, x)
    with pytest.raises(ValueError, match=match):
        jpeft.probe(apply, params, x)
    # found from the values, not the module class: dropout alone names the RNG count only
    drop = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    apply_d, params_d = jpeft.nnx.split(drop)
    with pytest.raises(ValueError, match=r"state: rngs/count \(RngCount\)\. apply"):
        apply_d(params_d, x)
    # in evaluation mode nothing changes: no state needed, and the output is the module's own
    model.eval()
    apply_e, params_e = jpeft.nnx.split(model)
    np.testing.assert_allclose(jax.jit(apply_e)(params_e, x), model(x), rtol=1e-6)


class _Transformed(nnx.Module):
    """``_Net``'s layers run through ``nnx.remat`` and ``nnx.jit``, which write every variable of
    the module they are given back after the call, changed or not."""

    def __init__(self):
        self.net = _Net()

    def __call__(self, x):
        h = nnx.remat(lambda n, x: n.bn(n.up(x)))(self.net, x)
        return nnx.jit(lambda n, h: n.head(n.drop(jax.nn.relu(h))))(self.net, h)


def test_write_backs_of_unchanged_variables_are_not_changes():
    """Under ``nnx.remat``/``nnx.jit`` inside the model the state is told apart from the
    variables they merely write back: train mode raises naming the state alone (eager, jit,
    probe), returns the module's own state with ``state=``; evaluation mode needs no state."""
    model = _Transformed()
    apply, params = jpeft.nnx.split(model)
    x = _x()
    match = r"state: net/bn/mean \(BatchStat\), net/bn/var \(BatchStat\), net/drop/rngs/count"
    for f in (apply, jax.jit(apply), lambda p, x: jpeft.probe(apply, p, x)):
        with pytest.raises(ValueError, match=match + r" \(RngCount\)\. apply"):
            f(params, x)
    ref = nnx.clone(model)
    out, state = jax.jit(apply)(params, x, state=jpeft.nnx.state(model))
    np.testing.assert_allclose(out, ref(x), rtol=1e-5, atol=1e-6)
    _assert_state_equal(state["net"], _module_state(ref.net))
    out, state = apply(params, x, state=state)                 # eagerly
    np.testing.assert_allclose(out, ref(x), rtol=1e-5, atol=1e-6)
    _assert_state_equal(state["net"], _module_state(ref.net))
    model.eval()
    apply, params = jpeft.nnx.split(model)
    want = model(x)
    np.testing.assert_allclose(jax.jit(apply)(params, x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply(params, x), want, rtol=1e-5, atol=1e-6)
    assert (("net", "up"), "out") in jpeft.probe(apply, params, x).marks


def test_users_module_is_never_changed():
    """Every variable (RNG count and key included) and the class of every sub-module are exactly
    as before after split, eager, jit, grad, probe, wrap and a raising call."""
    model = _Net()
    before = _snapshot(model)
    apply, params = jpeft.nnx.split(model)
    state = jpeft.nnx.state(model)
    x = _x()
    apply(params, x, state=state)
    jax.jit(apply)(params, x, state=state)
    jax.grad(lambda p: apply(p, x, state=state)[0].sum())(params)
    with pytest.raises(ValueError):
        apply(params, x)
    sites = jpeft.probe(apply, params, x, state=state)
    method = jpeft.lora("all-linear", rank=2)
    jax.jit(jpeft.wrap(apply, method, sites))(params, method.init(jax.random.key(0), params,
                                                                  sites), x, state=state)
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for path in before:
        assert after[path][0] is before[path][0]
        np.testing.assert_array_equal(after[path][1], before[path][1], err_msg=str(path))
    assert type(model.up) is nnx.Linear and type(model.bn) is nnx.BatchNorm
    assert all("_jpeft_scope" not in vars(m) for _, m in nnx.iter_modules(model))


def test_grad_with_state_equals_nnx_grad():
    model = _Net()
    ref = nnx.clone(model)
    apply, params = jpeft.nnx.split(model)
    x = _x()
    (loss, state), g = jax.jit(jax.value_and_grad(
        lambda p: (lambda o, s: (o.sum(), s))(*apply(p, x, state=jpeft.nnx.state(model))),
        has_aux=True))(params)
    want = nnx.to_pure_dict(nnx.grad(lambda m: m(x).sum())(ref))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g, want)
    _assert_state_equal(state, _module_state(ref))


def test_lora_on_a_train_mode_model_with_state_jitted():
    """LoRA (factored, through the data-flow backend) on a model with BatchNorm in train mode and
    Dropout: the output and the new state equal the module's own call on a clone whose kernels
    are the merged ``W + s A B``, and ``apply`` run on ``method.merge``'s weights."""
    model = _Net()
    apply, params = jpeft.nnx.split(model)
    state = jpeft.nnx.state(model)
    x = _x()
    sites = jpeft.probe(apply, params, x, state=state)
    assert {"/".join(p) for p in sites.contractions} == {"up/kernel", "head/kernel"}
    method = jpeft.lora("all-linear", rank=2, alpha=4.0)
    delta = perturb(method.init(jax.random.key(1), params, sites), scale=0.3)
    out, new_state = jax.jit(jpeft.wrap(apply, method, sites))(params, delta, x, state=state)

    merged = method.merge(params, delta, sites)
    ref = nnx.clone(model)
    ref.up.kernel[...] = merged["up"]["kernel"]
    ref.head.kernel[...] = merged["head"]["kernel"]
    want = ref(x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    _assert_state_equal(new_state, _module_state(ref))
    assert not np.allclose(want, nnx.clone(model)(x), atol=1e-3)      # LoRA changes the output
    out_m, state_m = apply(merged, x, state=state)
    np.testing.assert_allclose(out, out_m, rtol=1e-5, atol=1e-5)
    _assert_state_equal(new_state, jax.tree.map(_raw, state_m))


def test_marks_are_built_into_the_graph_definition():
    """Inside ``apply`` each sub-module is an instance of a marking subclass of its own class
    (``isinstance`` holds, same name), with its path; the user's modules keep their classes, and
    splitting again reuses the classes."""
    model = _Net()
    seen = {}

    def method(m, x):
        seen.update(up=type(m.up), bn=type(m.bn), root=type(m))
        assert isinstance(m.up, nnx.Linear) and isinstance(m.bn, nnx.BatchNorm)
        return m(x)
    model.eval()
    apply, params = jpeft.nnx.split(model, method=method)
    x = _x()
    sites = jpeft.probe(apply, params, x)
    assert {(("up",), "in"), (("up",), "out"), (("bn",), "out"), (("drop",), "in"),
            ((), "out")} <= set(sites.marks)
    assert seen["up"].__name__ == "Linear" and seen["up"] is not nnx.Linear
    assert seen["up"]._jpeft_scope == ("up",) and marks_lib.scope_of(seen["bn"]) == ("bn",)
    assert type(model.up) is nnx.Linear and marks_lib.scope_of(model.up) == ()
    n = len(marks_lib._MARKED_CLASSES)
    jpeft.nnx.split(_Net(seed=1))
    assert len(marks_lib._MARKED_CLASSES) == n


class _AssignsParam(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((3,)))

    def __call__(self, x):
        self.w[...] = self.w[...] * 2
        return x * self.w[...]


class _AddsVariable(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((3,)))

    def __call__(self, x):
        self.seen = nnx.Variable(x)
        return x * self.w[...]


class _HasStateArg(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.ones((3,)))

    def __call__(self, x, state=None):
        return x * self.w[...] + (0.0 if state is None else state)


def test_errors_name_the_problem():
    model = _Net()
    apply, params = jpeft.nnx.split(model)
    state, x = jpeft.nnx.state(model), _x()
    with pytest.raises(ValueError, match=r"params does not match.*missing \['up/bias'\]"):
        apply({**params, "up": {"kernel": params["up"]["kernel"]}}, x, state=state)
    with pytest.raises(ValueError, match=r"params does not match.*unexpected \['extra'\]"):
        apply({**params, "extra": jnp.zeros(1)}, x, state=state)
    with pytest.raises(ValueError, match=r"state does not match.*missing \['drop/rngs/count', "
                                         r"'drop/rngs/key'\].*jpeft.nnx.state"):
        apply(params, x, state={"bn": state["bn"]})
    x3 = jnp.ones((2, 3))
    a, p = jpeft.nnx.split(_AssignsParam())
    for f in (a, jax.jit(a)):
        with pytest.raises(ValueError, match=r"assigns the parameters \['w'\]"):
            f(p, x3, state={})
    a, p = jpeft.nnx.split(_AddsVariable())
    with pytest.raises(ValueError, match=r"added variables \['seen'\]"):
        jax.jit(a)(p, x3)
    a, p = jpeft.nnx.split(_HasStateArg())
    np.testing.assert_array_equal(a(p, x3), x3)
    with pytest.raises(ValueError, match=r"_HasStateArg.__call__ has its own parameter 'state'"):
        a(p, x3, state={})
    a, p = jpeft.nnx.split(_HasStateArg(), method=lambda m, x, module_state: m(x, module_state))
    np.testing.assert_array_equal(a(p, x3, 1.0), x3 + 1.0)
