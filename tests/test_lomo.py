"""LOMO and AdaLomo (jpeft.lomo): the update fused into the backward pass.

Numerics: three steps equal plain SGD / a hand-written AdaLomo on the full gradient (a tiny MLP,
a plain-JAX layer scan, the tiny LLaMA unrolled and ``nnx.scan``-stacked), and lomo-optim's
LOMO/AdaLomo in torch on the same MLP and batches. Memory: the compiled step of the stacked
decoder holds no stacked gradient (``memory_analysis``).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import lomo
from jpeft.core import paths
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM, convert_layers

from conftest import require


# --------------------------------------------------------------------------------------------
# References on the whole gradient


def sgd_reference(loss, params, batches, lr, wd=0.0, clip_value=None, clip_norm=None):
    """Plain SGD as lomo-optim's LOMO computes it: value clip, then global-norm clip (norm of
    the raw gradient), decoupled decay, step."""
    grad = jax.jit(jax.grad(loss))
    for b in batches:
        g = grad(params, *b)
        norm = optax.tree.norm(g)
        if clip_value is not None:
            g = jax.tree.map(lambda x: jnp.clip(x, -clip_value, clip_value), g)
        if clip_norm is not None:
            coef = jnp.minimum(clip_norm / (norm + 1e-6), 1.0)
            g = jax.tree.map(lambda x: x * coef, g)
        params = jax.tree.map(lambda p, g: p * (1 - lr * wd) - lr * g, params, g)
    return params


def adalomo_reference(loss, params, batches, lr, wd=0.0, eps=(1e-30, 1e-3), clip_threshold=1.0,
                      stacked=()):
    """AdaLomo written out on the whole gradient: Adafactor-style factored second moments
    (rows: mean over the last axis, columns: over the one before), RMS-clipped update, learning
    rate scaled by the parameter's RMS. Leaves in ``stacked`` are one tensor per leading
    index (a layer stack)."""
    def tensor(p, g, m, t):
        beta = 1.0 - t ** -0.8
        u2 = g * g + eps[0]
        if p.ndim >= 2:
            r = beta * m[0] + (1 - beta) * u2.mean(-1)
            c = beta * m[1] + (1 - beta) * u2.mean(-2)
            v = (r / r.mean(-1, keepdims=True))[..., :, None] * c[..., None, :]
            m = (r, c)
        else:
            v = beta * m[0] + (1 - beta) * u2
            m = (v,)
        u = g / jnp.sqrt(v)
        u = u / jnp.maximum(jnp.sqrt(jnp.mean(u * u)) / clip_threshold, 1.0)
        step = lr * jnp.maximum(eps[1], jnp.sqrt(jnp.mean(p * p)))
        return p * (1 - step * wd) - step * u, m

    def zeros(p):
        return (jnp.zeros(p.shape[:-1]), jnp.zeros(p.shape[:-2] + p.shape[-1:])) \
            if p.ndim >= 2 else (jnp.zeros(p.shape),)

    def one(p, g, m, t, stacked_leaf):
        if stacked_leaf:
            return jax.vmap(lambda p_, g_, m_: tensor(p_, g_, m_, t))(p, g, m)
        return tensor(p, g, m, t)

    @jax.jit
    def update(flat, moments, grads, t):
        out = {k: one(p, grads[k], moments[k], t, k in stacked) for k, p in flat.items()}
        return {k: v[0] for k, v in out.items()}, {k: v[1] for k, v in out.items()}

    flat = paths.flatten(params)
    moments = {k: (jax.vmap(zeros)(p) if k in stacked else zeros(p)) for k, p in flat.items()}
    grad = jax.jit(jax.grad(loss))
    for t, b in enumerate(batches, start=1):
        grads = paths.flatten(grad(paths.unflatten(flat), *b))
        flat, moments = update(flat, moments, grads, jnp.float32(t))
    return paths.unflatten(flat)


def run(step, params, batches):
    state = step.init(params, *batches[0])
    metrics = []
    for b in batches:
        params, state, m = step(params, state, *b)
        metrics.append(m)
    return params, state, metrics


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    fa, fb = paths.flatten(a), paths.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), rtol=rtol, atol=atol,
                                   err_msg="/".join(k))


# --------------------------------------------------------------------------------------------
# Models


def mlp_params(key, d_in=6, d_hidden=8, d_out=3, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"l1": {"kernel": jax.random.normal(k1, (d_in, d_hidden), dtype) * 0.5,
                   "bias": jax.random.normal(k2, (d_hidden,), dtype) * 0.1},
            "l2": {"kernel": jax.random.normal(k3, (d_hidden, d_out), dtype) * 0.5,
                   "bias": jax.random.normal(k4, (d_out,), dtype) * 0.1}}


def mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return jnp.mean(jnp.square(h @ p["l2"]["kernel"] + p["l2"]["bias"] - y))


def mlp_batches(n=3, batch=5, d_in=6, d_out=3, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(7), 2 * n)
    return [(jax.random.normal(keys[2 * i], (batch, d_in), dtype),
             jax.random.normal(keys[2 * i + 1], (batch, d_out), dtype)) for i in range(n)]


def ce(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


@pytest.fixture(scope="module")
def llamas():
    """The tiny LLaMA, unrolled and scanned, same weights: ``{layout: (apply, params)}``."""
    unrolled = LlamaForCausalLM(LlamaConfig.tiny())
    return {"unrolled": jpeft.nnx.split(unrolled),
            "scanned": jpeft.nnx.split(convert_layers(unrolled, True))}


def token_batches(n=3):
    return [(jax.random.randint(jax.random.key(i), (2, 8), 0, 128),) for i in range(n)]


# --------------------------------------------------------------------------------------------
# LOMO == SGD


def test_lomo_equals_sgd_on_an_mlp():
    params, batches = mlp_params(jax.random.key(0)), mlp_batches()
    kw = dict(weight_decay=0.1, clip_grad_value=0.3, clip_grad_norm=0.5)
    step = lomo.make_step(mlp_loss, lomo.lomo(0.2, **kw), donate=False)
    got, state, metrics = run(step, params, batches)
    want = sgd_reference(mlp_loss, params, batches, 0.2, wd=0.1, clip_value=0.3, clip_norm=0.5)
    assert_trees_close(got, want)
    assert int(state.count) == 3
    # the first pass's norm is the raw gradient's global norm; no leaf is refused or unused
    g = jax.grad(mlp_loss)(params, *batches[0])
    np.testing.assert_allclose(metrics[0]["grad_norm"], optax.tree.norm(g), rtol=1e-6)
    assert not bool(metrics[0]["overflow"])
    p = step.plan(params, *batches[0])
    assert not p.unused and not p.fused_scan
    assert p.fused_op == (("l1", "kernel"), ("l2", "kernel"))      # kernels: in their product
    assert p.whole == (("l1", "bias"), ("l2", "bias"))


def stacked_mlp(key, layers=3, d=5):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"w": jax.random.normal(k1, (layers, d, d)) * 0.4,
            "b": jax.random.normal(k2, (layers, d)) * 0.1,
            "gain": 1.0 + 0.1 * jax.random.normal(k3, (d,)),
            "out": jax.random.normal(k4, (d, 2)) * 0.5}


def stacked_loss(reverse):
    def loss(p, x, y, noise):
        def body(h, xs):
            w, b, n = xs       # w, b: trainable slices; n: a scanned batch input
            return jnp.tanh((h * p["gain"]) @ w + b + n), jnp.sum(h)
        h, sums = jax.lax.scan(body, x, (p["w"], p["b"], noise), reverse=reverse)
        return jnp.mean(jnp.square(h @ p["out"] - y)) + 1e-3 * jnp.sum(sums)
    return loss


@pytest.mark.parametrize("reverse,dtype", [(False, jnp.float32), (True, jnp.float32),
                                           (False, jnp.float16)])
def test_lomo_in_a_plain_jax_layer_scan(reverse, dtype):
    """A ``lax.scan`` over stacked weights (forward or reversed), a trainable loop constant
    (``gain``, its gradient summed over layers) and a scanned batch input: the stacked leaves
    are updated slice by slice in the scan's backward pass, the rest at their identity. Float16
    weights take the read-update-write path (float32 arithmetic, rounded once)."""
    params = jax.tree.map(lambda a: a.astype(dtype), stacked_mlp(jax.random.key(1)))
    keys = jax.random.split(jax.random.key(2), 9)
    batches = [tuple(a.astype(dtype) for a in (
        jax.random.normal(keys[3 * i], (4, 5)), jax.random.normal(keys[3 * i + 1], (4, 2)),
        0.1 * jax.random.normal(keys[3 * i + 2], (3, 4, 5)))) for i in range(3)]
    loss = stacked_loss(reverse)
    step = lomo.make_step(loss, lomo.lomo(0.1, weight_decay=0.05), donate=False)
    p = step.plan(params, *batches[0])
    assert p.fused_scan == (("b",), ("w",)) and p.whole == (("gain",),)
    assert p.fused_op == (("out",),)
    got, _, _ = run(step, params, batches)
    if dtype == jnp.float32:
        assert_trees_close(got, sgd_reference(loss, params, batches, 0.1, wd=0.05))
    else:
        up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
        want = sgd_reference(loss, up(params), [up(b) for b in batches], 0.1, wd=0.05)
        assert all(a.dtype == dtype for a in jax.tree.leaves(got))
        assert_trees_close(up(got), want, rtol=1e-2, atol=2e-3)


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_lomo_equals_sgd_on_the_tiny_llama(llamas, layout):
    apply, params = llamas[layout]
    loss = lambda p, t: ce(apply(p, t), t)
    batches = token_batches()
    step = lomo.make_step(loss, lomo.lomo(0.5, weight_decay=0.01, clip_grad_norm=1.0),
                          donate=False)
    plan = step.plan(params, *batches[0])
    if layout == "scanned":     # every layer leaf in the layer scan's backward pass
        assert {p[:2] for p in plan.fused_scan} == {("model", "layers")}
        assert len(plan.fused_scan) == 9 and set(plan.stacked) == set(plan.fused_scan)
    else:
        assert not plan.fused_scan and not plan.unused
    got, _, _ = run(step, params, batches)
    assert_trees_close(got, sgd_reference(loss, params, batches, 0.5, wd=0.01, clip_norm=1.0),
                       rtol=1e-4, atol=1e-6)


def test_lomo_trains_a_full_finetune_delta(llamas):
    """``jpeft.full_finetune``'s selection: the delta is trained, the frozen rest is an argument
    of the loss; the stacked MLP kernels go through the layer scan."""
    apply, params = llamas["scanned"]
    method = jpeft.full_finetune(r".*/mlp/.*")
    delta = method.init(jax.random.key(0), params)
    loss = lambda d, base, t: ce(apply(method.merge(base, d), t), t)
    batches = [(params,) + b for b in token_batches()]
    step = lomo.make_step(loss, lomo.lomo(0.5))
    assert len(step.plan(delta, *batches[0]).fused_scan) == 3
    want = sgd_reference(loss, delta, batches, 0.5)
    got, _, _ = run(step, delta, batches)      # donated: the delta's buffers are reused
    assert_trees_close(got, want, rtol=1e-4, atol=1e-6)


def head_params(key, d=6, vocab=37, dtype=jnp.float32):
    """An embedding ``[vocab, d]``, per-head weights ``[2, d, 4]`` (a batch axis) and an output
    head ``[d, vocab]`` (37: no piece count divides it)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"embed": (jax.random.normal(k1, (vocab, d)) * 0.5).astype(dtype),
            "heads": (jax.random.normal(k2, (2, d, 4)) * 0.5).astype(dtype),
            "mix": (jax.random.normal(k3, (4, d)) * 0.5).astype(dtype),
            "head": (jax.random.normal(k4, (d, vocab)) * 0.5).astype(dtype)}


def head_loss(lookup):
    def loss(p, ids, targets):
        x = lookup(p["embed"], ids)                                   # [b, t, d]
        h = jnp.tanh(jnp.einsum("btd,hdk->hbtk", x, p["heads"]))      # heads: a batch-free rhs
        h = jnp.einsum("hbtk,kd->btd", h, p["mix"])                   # mix: rhs, free axis d
        logits = jnp.einsum("btd,dv->btv", x + h, p["head"]).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None],
                                             -1))
    return loss


LOOKUPS = {"index": lambda t, i: t[i],
           "take-fill": lambda t, i: jnp.take(t, i, axis=0, mode="fill", fill_value=0),
           "take-clip": lambda t, i: jnp.take(t, i, axis=0, mode="clip")}


@pytest.mark.parametrize("lookup", sorted(LOOKUPS))
@pytest.mark.parametrize("piece_bytes", [None, 4 * 6 * 5])
def test_lomo_applies_a_product_or_lookup_gradient_in_parts_exactly(lookup, piece_bytes):
    """LOMO's rule is elementwise, so the head's gradient is applied in pieces along its
    vocabulary axis (``piece_bytes=120``: 8 pieces of 5 columns of 37, the last 2 wide) and the
    embedding's as its looked-up rows (duplicates summed; out-of-range ids dropped, or clamped
    under ``mode="clip"``; the other rows only decay). Equal to SGD on the whole gradient
    (JAX's own transpose) with value and global-norm clipping and weight decay."""
    params = head_params(jax.random.key(3))
    keys = jax.random.split(jax.random.key(4), 6)
    batches = []
    for i in range(3):
        ids = jax.random.randint(keys[2 * i], (2, 9), 0, 12)          # few rows, duplicates
        ids = ids.at[0, 0].set(40).at[1, 3].set(-50)                  # out of range
        batches.append((ids, jax.random.randint(keys[2 * i + 1], (2, 9), 0, 37)))
    loss = head_loss(LOOKUPS[lookup])
    kw = dict(weight_decay=0.1, clip_grad_value=0.05, clip_grad_norm=0.8)
    step = lomo.make_step(loss, lomo.lomo(0.3, **kw), donate=False, piece_bytes=piece_bytes)
    assert set(step.plan(params, *batches[0]).fused_op) == {("embed",), ("heads",), ("mix",),
                                                            ("head",)}
    got, _, metrics = run(step, params, batches)
    want = sgd_reference(loss, params, batches, 0.3, wd=0.1, clip_value=0.05, clip_norm=0.8)
    assert_trees_close(got, want)
    g = jax.grad(loss)(params, *batches[0])
    np.testing.assert_allclose(metrics[0]["grad_norm"], optax.tree.norm(g), rtol=1e-6)
    # rows no position looked up only decayed
    seen = np.unique(np.clip(np.concatenate([np.asarray(b[0]).ravel() for b in batches]),
                             0 if lookup == "take-clip" else -1, 36))
    untouched = np.setdiff1d(np.arange(37), seen)
    np.testing.assert_allclose(got["embed"][untouched], params["embed"][untouched] * 0.97 ** 3,
                               rtol=1e-6)


def test_lomo_float16_parts_round_once():
    """Float16 tables and heads: every piece and row is updated in float32 and rounded once,
    as the whole tensor would be (the reference: the float32 update of the same float16
    values, rounded)."""
    params = head_params(jax.random.key(8), dtype=jnp.float16)
    ids = jnp.array([[1, 2, 2, 5], [7, 1, 0, 3]])
    batch = (ids, (ids + 3) % 37)
    loss = head_loss(LOOKUPS["index"])
    step = lomo.make_step(loss, lomo.lomo(0.3, weight_decay=0.1), donate=False, piece_bytes=24)
    got, _, _ = step(params, step.init(params, *batch), *batch)
    g = jax.grad(loss)(params, *batch)
    for k in ("embed", "head"):
        want = (params[k].astype(jnp.float32) * (1 - 0.03)
                - 0.3 * g[k].astype(jnp.float32)).astype(jnp.float16)
        assert got[k].dtype == jnp.float16
        np.testing.assert_allclose(np.asarray(got[k], np.float32), np.asarray(want, np.float32),
                                   rtol=2e-3, atol=1e-3, err_msg=k)


def lm_loss_model(p, ids, labels, mask):
    """An embedding, a hidden layer and the head in jpeft.lm_cross_entropy (chunks of 5 of the
    37 columns: the last one 2 wide)."""
    h = jnp.tanh(p["embed"][ids] @ p["mix"].T)
    return jpeft.lm_cross_entropy(h, p["head"], labels, mask, chunk=5)


@pytest.mark.parametrize("piece_bytes", [None, 4 * 6 * 3])
def test_lomo_applies_the_head_inside_the_chunked_lm_loss(piece_bytes):
    """The head's kernel used only by jpeft.lm_cross_entropy is updated chunk by chunk inside
    the loss's backward pass (chunks narrowed to 3 columns by ``piece_bytes=72``): LOMO equals
    SGD (value and norm clipping, weight decay; the norm pass pieced too), AdaLomo its
    reference (the head's gradient gathered whole)."""
    p = head_params(jax.random.key(9))
    params = {"embed": p["embed"], "mix": p["mix"][:, :6].T @ p["mix"][:, :6] * 0.3,
              "head": p["head"]}
    keys = jax.random.split(jax.random.key(10), 9)
    batches = [(jax.random.randint(keys[3 * i], (2, 6), 0, 37),
                jax.random.randint(keys[3 * i + 1], (2, 6), 0, 37),
                (jax.random.uniform(keys[3 * i + 2], (2, 6)) > 0.2).astype(jnp.float32))
               for i in range(3)]
    kw = dict(weight_decay=0.1, clip_grad_value=0.05, clip_grad_norm=0.8)
    step = lomo.make_step(lm_loss_model, lomo.lomo(0.3, **kw), donate=False,
                          piece_bytes=piece_bytes)
    assert ("head",) in step.plan(params, *batches[0]).fused_op
    got, _, metrics = run(step, params, batches)
    assert_trees_close(got, sgd_reference(lm_loss_model, params, batches, 0.3, wd=0.1,
                                          clip_value=0.05, clip_norm=0.8))
    g = jax.grad(lm_loss_model)(params, *batches[0])
    np.testing.assert_allclose(metrics[0]["grad_norm"], optax.tree.norm(g), rtol=1e-6)
    step = lomo.make_step(lm_loss_model, lomo.adalomo(0.05, weight_decay=0.1), donate=False,
                          piece_bytes=piece_bytes)
    got, _, _ = run(step, params, batches)
    assert_trees_close(got, adalomo_reference(lm_loss_model, params, batches, 0.05, wd=0.1),
                       rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# AdaLomo == its hand-written reference


def test_adalomo_equals_the_reference_on_an_mlp():
    params, batches = mlp_params(jax.random.key(3)), mlp_batches()
    step = lomo.make_step(mlp_loss, lomo.adalomo(0.05, weight_decay=0.1), donate=False)
    got, state, _ = run(step, params, batches)
    assert_trees_close(got, adalomo_reference(mlp_loss, params, batches, 0.05, wd=0.1))
    m = state.moments
    assert isinstance(m["l1"]["kernel"], lomo.Factored) and m["l1"]["kernel"].row.shape == (6,)
    assert isinstance(m["l1"]["bias"], lomo.Full) and m["l1"]["bias"].v.shape == (8,)


def test_adalomo_per_layer_on_the_scanned_llama(llamas):
    """Layer-stacked leaves are L tensors (per-slice moments and RMS), as in the unrolled model:
    the scanned step equals the reference with per-layer tensors, and the unrolled step."""
    apply, params = llamas["scanned"]
    loss = lambda p, t: ce(apply(p, t), t)
    batches = token_batches(2)
    step = lomo.make_step(loss, lomo.adalomo(0.01, weight_decay=0.1), donate=False)
    stacked = step.plan(params, *batches[0]).stacked
    state = step.init(params, *batches[0])
    norm = state.moments["model"]["layers"]["input_layernorm"]["scale"]
    assert isinstance(norm, lomo.Full) and norm.v.shape == (2, 64)
    got, _, _ = run(step, params, batches)
    want = adalomo_reference(loss, params, batches, 0.01, wd=0.1, stacked=set(stacked))
    assert_trees_close(got, want, rtol=1e-4, atol=1e-6)
    # a state built without the program's stacking is refused with the way out
    with pytest.raises(ValueError, match="step.init"):
        step(params, lomo.adalomo(0.01).init(params), *batches[0])


# --------------------------------------------------------------------------------------------
# Against lomo-optim (torch)


@pytest.mark.torch
@pytest.mark.parametrize("which", ["lomo", "adalomo"])
def test_matches_lomo_optim_in_torch(which, monkeypatch):
    torch = require("torch")
    lomo_optim = require("lomo_optim")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)   # AdaLomo's state
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    params = {f"l{i}": {"kernel": jnp.asarray(net[j].weight.detach().numpy().T),
                        "bias": jnp.asarray(net[j].bias.detach().numpy())}
              for i, j in ((1, 0), (2, 2))}
    batches = mlp_batches()
    lr, kw = 0.05, dict(weight_decay=0.1, clip_grad_norm=0.5)
    if which == "lomo":
        topt = lomo_optim.Lomo(net, lr=lr, clip_grad_value=0.3, **kw)
        opt = lomo.lomo(lr, clip_grad_value=0.3, **kw)
    else:
        topt = lomo_optim.AdaLomo(net, lr=lr, loss_scale=2 ** 10, **kw)
        opt = lomo.adalomo(lr, loss_scale=2.0 ** 10, **kw)
    for x, y in batches:
        x_t, y_t = (torch.from_numpy(np.array(a)) for a in (x, y))
        loss = torch.mean((net(x_t) - y_t) ** 2)
        topt.grad_norm(loss)
        topt.fused_backward(loss, lr)
    got, _, _ = run(lomo.make_step(mlp_loss, opt), params, batches)
    for i, j in ((1, 0), (2, 2)):
        np.testing.assert_allclose(got[f"l{i}"]["kernel"], net[j].weight.detach().numpy().T,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[f"l{i}"]["bias"], net[j].bias.detach().numpy(),
                                   rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Loss scaling, refusals, semantics


def test_dynamic_loss_scale_skips_overflowing_steps_and_grows():
    """float16 weights: at scale 2**32 the backward pass overflows: the step is skipped
    (parameters and count unchanged) and the scale halved. At a small scale steps apply, and the
    scale doubles after every ``window`` clean steps."""
    params = mlp_params(jax.random.key(4), dtype=jnp.float16)
    batches = mlp_batches(dtype=jnp.float16)
    opt = lomo.lomo(0.1, loss_scale=lomo.DynamicLossScale(init_scale=2.0 ** 32))
    step = lomo.make_step(mlp_loss, opt, donate=False)
    state = step.init(params, *batches[0])
    new, state, m = step(params, state, *batches[0])
    assert bool(m["overflow"]) and int(state.count) == 0
    assert float(state.loss_scale.scale) == 2.0 ** 31
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new, params)

    opt = lomo.lomo(0.1, loss_scale=lomo.DynamicLossScale(init_scale=16.0, window=2))
    step = lomo.make_step(mlp_loss, opt, donate=False)
    state = step.init(params, *batches[0])
    p = params
    scales = []
    for b in batches:
        p, state, m = step(p, state, *b)
        assert not bool(m["overflow"])
        scales.append(float(state.loss_scale.scale))
    assert scales == [16.0, 32.0, 32.0] and int(state.count) == 3
    want = sgd_reference(mlp_loss, jax.tree.map(lambda a: a.astype(jnp.float32), params),
                         [tuple(a.astype(jnp.float32) for a in b) for b in batches], 0.1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a.astype(np.float32), b, atol=3e-3),
                 p, want)


def test_refusals_and_unused_leaves():
    params, batches = mlp_params(jax.random.key(5)), mlp_batches(1)
    with pytest.raises(ValueError, match="floating-point.*'l1/steps'"):
        lomo.lomo(0.1).init({**params, "l1": {**params["l1"], "steps": jnp.zeros((), jnp.int32)}})
    with pytest.raises(ValueError, match="positive"):
        lomo.lomo(0.1, clip_grad_norm=0.0)
    # a leaf the loss never uses is never updated (no decay either), as in lomo-optim
    extra = {**params, "unused": jnp.ones((3,))}
    step = lomo.make_step(mlp_loss, lomo.lomo(0.1, weight_decay=0.5), donate=False)
    assert step.plan(extra, *batches[0]).unused == (("unused",),)
    new, _, _ = step(extra, step.init(extra, *batches[0]), *batches[0])
    np.testing.assert_array_equal(new["unused"], extra["unused"])


def test_a_tied_leaf_is_updated_once_with_its_whole_gradient():
    params = mlp_params(jax.random.key(6), d_in=3, d_out=3)
    batches = mlp_batches(d_in=3, d_out=3)

    def tied(p, x, y):     # l1's kernel used twice (and transposed)
        h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
        return jnp.mean(jnp.square(h @ p["l1"]["kernel"].T + p["l2"]["bias"] - y))
    params = {"l1": params["l1"], "l2": {"bias": params["l2"]["bias"]}}
    got, _, _ = run(lomo.make_step(tied, lomo.lomo(0.3), donate=False), params, batches)
    assert_trees_close(got, sgd_reference(tied, params, batches, 0.3))


# --------------------------------------------------------------------------------------------
# Memory


def _decoder_steps(scan: bool):
    """On the tiny 4-layer decoder (full fine-tuning's delta): the compiled SGD step
    (jpeft.make_train_step, donated), the compiled LOMO step, LOMO's plan and the delta."""
    cfg = LlamaConfig.tiny(scan_layers=scan, num_hidden_layers=4)
    apply, params = jpeft.nnx.split(LlamaForCausalLM(cfg))
    tokens = jnp.zeros((2, 16), jnp.int32)
    method = jpeft.full_finetune()
    delta = method.init(jax.random.key(0), params)
    sgd = jpeft.make_train_step(
        lambda p, d, b, k: ce(apply(method.merge(p, d), b), b), optax.sgd(0.1),
        skip_nonfinite=False).lower(params, delta, optax.sgd(0.1).init(delta), tokens,
                                    jax.random.key(0)).compile()
    step = lomo.make_step(lambda d, p, b: ce(apply(method.merge(p, d), b), b), lomo.lomo(0.1))
    fused = step.lower(delta, step.init(delta, params, tokens), params, tokens).compile()
    return sgd, fused, step.plan(delta, params, tokens), delta


def test_the_stacked_decoder_step_holds_no_stacked_gradient():
    """``memory_analysis`` of the compiled steps, 4 scanned layers: LOMO's temporaries are
    below full fine-tuning with SGD (jpeft.make_train_step, donated) by at least the whole
    gradient less its largest leaf (what remains: one layer's gradient at a time)."""
    sgd, fused, _, delta = _decoder_steps(scan=True)
    sgd_temp = sgd.memory_analysis().temp_size_in_bytes
    lomo_temp = fused.memory_analysis().temp_size_in_bytes
    leaves = jax.tree.leaves(delta)
    gradient, largest = sum(x.nbytes for x in leaves), max(x.nbytes for x in leaves)
    assert sgd_temp - lomo_temp >= gradient - largest, (sgd_temp, lomo_temp, gradient, largest)


def _weight_copies(compiled) -> list[str]:
    """The instructions of the compiled step's entry computation that copy an entry parameter
    of rank 2 or more (a weight)."""
    text = compiled.as_text()
    entry = text[text.index("\nENTRY "):]
    params = set(re.findall(r"(%[\w.]+) = \S+\[\d+(?:,\d+)+\]\S* parameter\(", entry))
    return [m for m in re.findall(r"(%[\w.]+) = \S+ copy\((%[\w.]+)\)", entry)
            if m[1] in params]


@pytest.mark.parametrize("scan", [False, True])
def test_the_decoder_step_keeps_no_copy_of_a_weight(scan):
    """A weight used by one matrix product (every kernel of the unrolled decoder; the LM head of
    the scanned one) is updated in that product's backward pass after its read for the input's
    cotangent, so XLA updates the donated buffer in place. Full fine-tuning with SGD through
    jpeft.make_train_step, whose update is unordered with that read, keeps copies of the
    donated weights (the check sees them); LOMO keeps none and fewer temporaries."""
    sgd, fused, plan, _ = _decoder_steps(scan)
    assert ("lm_head", "kernel") in plan.fused_op
    assert _weight_copies(sgd)
    assert _weight_copies(fused) == []
    assert (fused.memory_analysis().temp_size_in_bytes
            < sgd.memory_analysis().temp_size_in_bytes)


@pytest.mark.parametrize("scan", [False, True])
def test_training_the_embedding_adds_no_table_sized_buffer(scan):
    """The embedding's gradient (its lookup's cotangent scattered into zeros) is formed in the
    lookup's backward pass: training the table adds next to nothing to LOMO's temporaries. (JAX's
    own transpose makes the zeros a constant that XLA creates at the start of the step: a
    table-sized buffer through the whole step, 262,272 bytes more here.)"""
    cfg = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, scan_layers=scan)
    apply, params = jpeft.nnx.split(LlamaForCausalLM(cfg))
    tokens = jnp.zeros((2, 16), jnp.int32)
    temp = {}
    for name, method in (("all", jpeft.full_finetune()),
                         ("frozen table", jpeft.full_finetune(exclude="model/embed_tokens"))):
        delta = method.init(jax.random.key(0), params)
        step = lomo.make_step(lambda d, p, b, m=method: ce(apply(m.merge(p, d), b), b),
                              lomo.lomo(0.1))
        if name == "all":
            assert ("model", "embed_tokens", "embedding") in step.plan(delta, params,
                                                                       tokens).fused_op
        temp[name] = step.lower(delta, step.init(delta, params, tokens), params,
                                tokens).compile().memory_analysis().temp_size_in_bytes
    table = params["model"]["embed_tokens"]["embedding"].nbytes
    assert temp["all"] - temp["frozen table"] < table // 4, (temp, table)


@pytest.mark.parametrize("scan", [False, True])
def test_a_large_vocabulary_adds_no_table_sized_gradient(scan):
    """A vocabulary 16 times the hidden size (LOMO's setting: a few tokens, a large model): the
    LM head's gradient is applied in pieces and the embedding's as its looked-up rows, so
    LOMO's temporaries stay under a third of one table (2 MiB here). With the head's
    gradient whole (``piece_bytes`` past its size) they exceed a table: the check sees one.
    AdaLomo needs the head's whole gradient, but the backward pass goes on only after the
    head's update, so the head's gradient is gone before the embedding's is formed: under
    two and a half tables (three, 6.3 MB, when XLA deferred the head's update to the end)."""
    cfg = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, scan_layers=scan)
    apply, params = jpeft.nnx.split(LlamaForCausalLM(cfg))
    tokens = jnp.zeros((1, 4), jnp.int32)
    loss = lambda p, t: ce(apply(p, t), t)
    table = params["model"]["embed_tokens"]["embedding"].nbytes
    temp = {}
    for name, opt, kw in (("parts", lomo.lomo(0.1), {}),
                          ("whole head", lomo.lomo(0.1), {"piece_bytes": 2 ** 40}),
                          ("adalomo", lomo.adalomo(0.1), {})):
        step = lomo.make_step(loss, opt, **kw)
        temp[name] = step.lower(params, step.init(params, tokens),
                                tokens).compile().memory_analysis().temp_size_in_bytes
    assert temp["parts"] < table // 3 < table < temp["whole head"], (temp, table)
    assert temp["adalomo"] < 2.5 * table, (temp, table)


def test_the_chunked_lm_loss_removes_the_logits_cotangent():
    """4 x 32 tokens, a vocabulary of 4,096 (logits ``[4, 31, 4096]``: 2 MB): with the
    decoder's head in jpeft.lm_cross_entropy LOMO's step holds more than three logits-sized
    buffers fewer (13.2 MB -> 4.2 MB) than with the logits formed and the loss taken on them
    (the logits, softmax and their cotangents)."""
    cfg = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, scan_layers=True)
    net = LlamaForCausalLM(cfg)
    apply, params = jpeft.nnx.split(net)
    body, _ = jpeft.nnx.split(net.model)
    tokens = jnp.zeros((4, 32), jnp.int32)

    def chunked(p, t):
        hidden, _ = body(p["model"], t)
        return jpeft.lm_cross_entropy(hidden[:, :-1], p["lm_head"]["kernel"], t[:, 1:],
                                      chunk=512)
    logits = 4 * 31 * 4096 * 4
    temp = {}
    for name, loss in (("chunked", chunked), ("logits", lambda p, t: ce(apply(p, t), t))):
        step = lomo.make_step(loss, lomo.lomo(0.1))
        temp[name] = step.lower(params, step.init(params, tokens),
                                tokens).compile().memory_analysis().temp_size_in_bytes
    assert temp["logits"] - temp["chunked"] > 3 * logits, (temp, logits)
