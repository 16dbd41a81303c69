"""AdaLoRA against the math: schedule, importance EMAs, budget masking, penalty, merge, defaults."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import require

import jpeft
from jpeft.core import paths
from jpeft.methods import adalora as ada


@pytest.fixture
def setup(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    method = ada.adalora(("query", "value"), init_r=4, alpha=4)
    delta = method.init(jax.random.key(0), variables, tiny_sites)
    return model, variables, method, delta, tiny_batch, tiny_sites


def _ref_budget(t, b0, bt, ti, tf, total):
    if t <= ti:
        return b0
    if t >= total - tf:
        return bt
    return int((b0 - bt) * (1 - (t - ti) / (total - ti - tf)) ** 3 + bt)


def test_zero_lambda_is_the_base_model_and_merge_is_exact(setup):
    model, variables, method, delta, batch, sites = setup
    f = jpeft.wrap(model.apply, method, sites)
    np.testing.assert_array_equal(f(variables, delta, **batch), model.apply(variables, **batch))
    delta = jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 100.0 if paths.to_path(kp)[-1] == "lora_E" else x, delta)
    out = f(variables, delta, **batch)
    assert not np.allclose(out, model.apply(variables, **batch), atol=1e-4)
    np.testing.assert_allclose(model.apply(method.merge(variables, delta, sites), **batch), out, atol=1e-5)
    # Independent merge: W0 + (alpha / r) * P diag(lam) Q in float64.
    merged = paths.flatten(method.merge(variables, delta, sites))
    for kernel, t in ada.triplets(delta).items():
        p, lam, q = (np.asarray(t[n], np.float64) for n in ("lora_A", "lora_E", "lora_B"))
        want = np.asarray(paths.flatten(variables)[kernel], np.float64) + (4 / 4) * (p * lam) @ q
        np.testing.assert_allclose(merged[kernel], want, atol=1e-5)
    back = method.unmerge(method.merge(variables, delta, sites), delta, sites)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, variables)


def test_counts(setup, tiny_config):
    _, _, _, delta, _, sites = setup
    h, layers = tiny_config.hidden_size, tiny_config.num_hidden_layers
    assert jpeft.num_params(delta) == layers * 2 * (4 * h + 4 + 4 * h)


def test_budget_schedule_matches_the_formula():
    sched = ada.budget_schedule(5, init_r=12, target_r=8, t_init=10, t_final=20, delta_t=3,
                                total_steps=100)
    for t in range(1, 121):
        assert int(sched.budget(t)) == _ref_budget(t, 60, 40, 10, 20, 100), t
    assert int(sched.budget(11)) < 60 and int(sched.budget(79)) >= 40


def _run(model, variables, method, delta, batch, sites, steps, **kw):
    f = jpeft.wrap(model.apply, method, sites)
    labels = jnp.array([0, 1, 1])

    def loss(d):
        logits = f(variables, d, **batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    opt = ada.adalora_optimizer(optax.adam(1e-2), total_steps=steps, **kw)
    state = opt.init(delta)
    history = []
    grad, update = jax.jit(jax.grad(loss)), jax.jit(opt.update)
    for _ in range(steps):
        g = grad(delta)
        updates, state = update(g, state, delta)
        delta = optax.apply_updates(delta, updates)
        history.append((int(state.count), int(state.budget), delta, g, state))
    return delta, state, history


def test_budget_follows_schedule_and_final_rank_equals_target(setup):
    model, variables, method, delta, batch, sites = setup
    kw = dict(init_r=4, target_r=2, t_init=3, t_final=4, delta_t=2)
    final, state, history = _run(model, variables, method, delta, batch, sites, 20, **kw)
    n = len(ada.triplets(delta))
    for t, b, *_ in history:
        assert b == _ref_budget(t, 4 * n, 2 * n, 3, 4, 20), t
    pattern = ada.rank_pattern(final)
    assert sum(pattern.values()) == 2 * n
    assert sum(int(v.sum()) for v in state.pattern.values()) == 2 * n
    # Before t_init nothing is masked.
    assert all(int(jnp.count_nonzero(t["lora_E"])) == 4
               for t in ada.triplets(history[2][2]).values())


def test_masked_triplets_still_get_gradients(setup):
    model, variables, method, delta, batch, sites = setup
    final, state, history = _run(model, variables, method, delta, batch, sites, 8,
                                 init_r=4, target_r=1, t_init=1, t_final=2, delta_t=1)
    # In the decay phase a dropped lam is zero right after the update, but its next gradient is not.
    t, b, d, _, _ = history[3]
    _, _, _, g_next, _ = history[4]
    dropped = [(p, i) for p, tr in ada.triplets(d).items()
               for i in range(4) if float(tr["lora_E"][i]) == 0.0]
    assert dropped
    g_trip = ada.triplets(g_next)
    assert any(abs(float(g_trip[p]["lora_E"][i])) > 0 for p, i in dropped)


def test_importance_emas_match_numpy(setup):
    model, variables, method, delta, batch, sites = setup
    _, _, history = _run(model, variables, method, delta, batch, sites, 5, init_r=4, target_r=2,
                         t_init=1, t_final=1)
    ipt, unc = {}, {}
    prev = delta
    for t, _, d, g, state in history:
        if t > 5 - 1:       # the EMAs stop at T - t_final, when the final pattern is fixed
            for key in state.ipt:
                np.testing.assert_array_equal(state.ipt[key]["lora_E"],
                                              history[t - 2][4].ipt[key]["lora_E"])
            break
        for path, trip in ada.triplets(prev).items():
            gt = ada.triplets(g)[path]
            for n in ("lora_A", "lora_E", "lora_B"):
                k = (path, n)
                i_now = np.abs(np.asarray(trip[n], np.float64) * np.asarray(gt[n], np.float64))
                ipt[k] = 0.85 * ipt.get(k, 0) + 0.15 * i_now
                unc[k] = 0.85 * unc.get(k, 0) + 0.15 * np.abs(i_now - ipt[k])
        prev = d
    for (path, n), want in ipt.items():
        np.testing.assert_allclose(state.ipt[paths.path_str(path)][n], want, rtol=1e-4, atol=1e-12)
        np.testing.assert_allclose(state.unc[paths.path_str(path)][n], unc[(path, n)],
                                   rtol=1e-4, atol=1e-12)


def test_orthogonality_penalty():
    q1, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 4)))
    q2, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(10, 4)))
    delta = {"w": {"kernel": {"lora_A": jnp.asarray(q1), "lora_E": jnp.zeros(4),
                              "lora_B": jnp.asarray(q2.T)}}}
    assert float(ada.orthogonality_penalty(delta)) == pytest.approx(0.0, abs=1e-10)
    p = np.random.default_rng(2).normal(size=(16, 4))
    q = np.random.default_rng(3).normal(size=(4, 10))
    delta2 = {"w": {"kernel": {"lora_A": jnp.asarray(p), "lora_E": jnp.zeros(4),
                               "lora_B": jnp.asarray(q)}}}
    want = 0.5 * (np.sum((p.T @ p - np.eye(4)) ** 2) + np.sum((q @ q.T - np.eye(4)) ** 2))
    assert float(ada.orthogonality_penalty(delta2)) == pytest.approx(want, rel=1e-5)


def test_defaults_match_hugging_face_peft():
    peft = require("peft")
    cfg = peft.AdaLoraConfig(total_step=100)
    opt_defaults = inspect.signature(ada.adalora_optimizer).parameters
    assert cfg.init_r == inspect.signature(ada.adalora).parameters["init_r"].default == 12
    assert cfg.target_r == opt_defaults["target_r"].default == 8
    assert cfg.beta1 == opt_defaults["beta1"].default == 0.85
    assert cfg.beta2 == opt_defaults["beta2"].default == 0.85
    assert cfg.orth_reg_weight == inspect.signature(ada.orthogonality_penalty).parameters["weight"].default
    assert opt_defaults["init_r"].default == 12


def test_errors(setup):
    _, variables, _, delta, _, sites = setup
    with pytest.raises(ValueError, match="target_r 13 is above init_r 12"):
        ada.budget_schedule(2, init_r=12, target_r=13, total_steps=10)
    with pytest.raises(ValueError, match="t_init .* t_final .* total_steps"):
        ada.budget_schedule(2, t_init=6, t_final=5, total_steps=10)
    with pytest.raises(ValueError, match="init_r 40 is larger"):
        ada.adalora(("query",), init_r=40).init(jax.random.key(0), variables, sites)
    with pytest.raises(ValueError, match="no AdaLoRA triplets"):
        ada.adalora_optimizer(optax.sgd(1.0), total_steps=10).init({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="init_r=12 but"):
        ada.adalora_optimizer(optax.sgd(1.0), total_steps=10).init(delta)


def test_shardings_follow_the_weight(setup, mesh):
    from jax.sharding import NamedSharding, PartitionSpec as P
    _, variables, method, delta, _, sites = setup
    shard = jax.tree.map(lambda x: NamedSharding(mesh, P(None, "model") if x.ndim == 2 else P()),
                         variables)
    ds = jpeft.delta_shardings(method, shard, delta, sites)
    q = ds["params"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]
    assert (q["lora_A"].spec, q["lora_E"].spec, q["lora_B"].spec) == (P(None, None), P(None), P(None, "model"))


def test_orthogonality_penalty_hugging_face_convention():
    rng = np.random.default_rng(4)
    mats = [(rng.normal(size=(16, 4)), rng.normal(size=(4, 10))) for _ in range(3)]
    delta = {f"m{i}": {"kernel": {"lora_A": jnp.asarray(p), "lora_E": jnp.zeros(4),
                                  "lora_B": jnp.asarray(q)}} for i, (p, q) in enumerate(mats)}
    norms = []
    for p, q in mats:   # HF: torch.norm(A A^T - I) for lora_A [r, in], B^T B - I for lora_B [out, r]
        norms += [np.linalg.norm(p.T @ p - np.eye(4)), np.linalg.norm(q @ q.T - np.eye(4))]
    got = ada.orthogonality_penalty(delta, convention="hf")
    assert float(got) == pytest.approx(0.5 * np.mean(norms), rel=1e-5)
    with pytest.raises(ValueError, match="convention"):
        ada.orthogonality_penalty(delta, convention="torch")


def test_kept_triplets_are_the_highest_scoring_by_an_independent_numpy_allocator():
    """Which triplets survive, step by step, against a numpy re-implementation of the paper's
    allocator: EMAs ``I_bar = b1 I_bar + (1 - b1) |w g|``, ``U_bar = b2 U_bar + (1 - b2) |I - I_bar|``
    (``I`` the step's sensitivity, ``I_bar`` the new EMA), score ``S_k = s(lam_k) + mean_i s(P_ik)
    + mean_j s(Q_kj)`` with ``s = I_bar * U_bar``, the ``b(t)`` highest scores kept over all
    matrices and slices (one unstacked and one layer-stacked weight), dropped ``lam`` zeroed."""
    rng = np.random.default_rng(3)
    r, T, ti, tf, b1, b2, lr = 4, 10, 2, 3, 0.85, 0.85, 0.01
    shapes = {"m1": ((), 6, 5), "m2": ((2,), 3, 7)}         # (stack, in, out)
    delta = {m: {"kernel": {"lora_A": rng.normal(size=s + (i, r)).astype(np.float32),
                            "lora_E": rng.normal(size=s + (r,)).astype(np.float32),
                            "lora_B": rng.normal(size=s + (r, o)).astype(np.float32)}}
             for m, (s, i, o) in shapes.items()}
    opt = ada.adalora_optimizer(optax.sgd(lr), total_steps=T, init_r=r, target_r=2,
                                    t_init=ti, t_final=tf, delta_t=1, beta1=b1, beta2=b2)
    state = opt.init(delta)
    d = jax.tree.map(np.asarray, delta)
    ref = jax.tree.map(np.array, delta)
    ipt = jax.tree.map(np.zeros_like, ref)
    unc = jax.tree.map(np.zeros_like, ref)
    n_mats, kept_counts = 1 + 2, []
    for t in range(1, T + 1):
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), ref)
        updates, state = opt.update(grads, state, d)
        d = jax.tree.map(np.asarray, optax.apply_updates(d, updates))
        # numpy allocator
        if t <= T - tf:
            for m in ref:
                for n in ("lora_A", "lora_E", "lora_B"):
                    now = np.abs(ref[m]["kernel"][n] * grads[m]["kernel"][n])
                    ipt[m]["kernel"][n] = b1 * ipt[m]["kernel"][n] + (1 - b1) * now
                    unc[m]["kernel"][n] = (b2 * unc[m]["kernel"][n]
                                           + (1 - b2) * np.abs(now - ipt[m]["kernel"][n]))
        s = {m: {n: ipt[m]["kernel"][n] * unc[m]["kernel"][n] for n in ipt[m]["kernel"]}
             for m in ref}
        scores = {m: s[m]["lora_E"] + s[m]["lora_A"].mean(-2) + s[m]["lora_B"].mean(-1)
                  for m in ref}
        b0, bT = r * n_mats, 2 * n_mats
        frac = 1 - (t - ti) / (T - ti - tf)
        budget = b0 if t <= ti else bT if t >= T - tf else int(
            np.floor((b0 - bT) * np.clip(frac, 0, 1) ** 3 + bT))
        for m in ref:
            ref[m]["kernel"] = {n: ref[m]["kernel"][n] - lr * grads[m]["kernel"][n]
                                for n in ref[m]["kernel"]}
        if ti < t <= T - tf:
            flat = np.concatenate([scores[m].ravel() for m in ref])
            cut = np.sort(flat)[::-1][budget - 1]
            for m in ref:
                keep = scores[m] >= cut
                ref[m]["kernel"]["lora_E"] = np.where(keep, ref[m]["kernel"]["lora_E"], 0.0)
                np.testing.assert_array_equal(np.asarray(state.pattern[f"{m}/kernel"]), keep)
            kept_counts.append(int(sum((scores[m] >= cut).sum() for m in ref)))
        elif t > T - tf:     # pattern frozen: the dropped triplets stay at zero
            for m in ref:
                keep = np.asarray(state.pattern[f"{m}/kernel"])
                ref[m]["kernel"]["lora_E"] = np.where(keep, ref[m]["kernel"]["lora_E"], 0.0)
        for m in ref:
            for n in ("lora_A", "lora_E", "lora_B"):
                np.testing.assert_allclose(d[m]["kernel"][n], ref[m]["kernel"][n], rtol=1e-5,
                                           atol=1e-6, err_msg=f"step {t} {m} {n}")
    assert kept_counts[0] < r * n_mats and kept_counts[-1] == 2 * n_mats
