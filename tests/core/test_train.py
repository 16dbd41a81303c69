"""The train step: gradients only for the delta, optimizer state only for the delta, partitions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import functools

import jpeft


def _loss(model, method, sites=None):
    f = jpeft.wrap(model.apply, method, sites)

    def loss(params, delta, batch, key):
        logits = f(params, delta, batch["input_ids"], batch["attention_mask"],
                   batch["token_type_ids"], delta_rng=key)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return nll, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["labels"])}
    return loss


@pytest.fixture
def lora_head(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.compose(lora=jpeft.lora(("query", "value"), rank=4, dropout=0.1),
                           head=jpeft.full_finetune(("classifier",)))
    delta = method.init(jax.random.key(0), variables, tiny_sites)
    batch = dict(tiny_batch, labels=np.array([0, 1, 1], np.int32))
    return model, variables, functools.partial(_loss, sites=tiny_sites), method, delta, batch


def test_step_changes_only_the_delta(lora_head):
    model, variables, _loss, method, delta, batch = lora_head
    before_params = jax.tree.map(np.asarray, variables)
    before_delta = jax.tree.map(np.asarray, delta)
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(_loss(model, method), opt)
    new_delta, _, metrics = step(variables, delta, jpeft.init_opt_state(opt, delta), batch,
                                 jax.random.key(1))
    assert set(metrics) == {"loss", "accuracy", "skipped", "skipped_in_row", "skipped_total"}
    assert not metrics["skipped"] and metrics["skipped_total"] == 0
    jax.tree.map(np.testing.assert_array_equal, variables, before_params)
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), new_delta, before_delta)
    assert changed["head"]["params"]["classifier"]["kernel"]
    assert all(jax.tree.leaves(changed["lora"]["params"]["bert"]["encoder"]["layer"]["0"]["attention"]
                               ["self"]["query"]["kernel"]["lora_B"]))


def test_optimizer_state_exists_only_for_the_delta(lora_head):
    _, variables, _, _, delta, _ = lora_head
    state = jpeft.init_opt_state(optax.adam(1e-3), delta)
    # Adam: first and second moments shaped like the delta, plus one int32 step count.
    assert jpeft.num_bytes(state) == 2 * jpeft.num_bytes(delta) + 4
    assert jpeft.num_bytes(state) < jpeft.num_bytes(variables)


def test_partition_gives_each_part_its_own_optimizer(lora_head):
    model, variables, _loss, method, delta, batch = lora_head
    opt = jpeft.partition({"lora": optax.sgd(0.0), "head": optax.sgd(1.0)}, method)
    step = jpeft.make_train_step(_loss(model, method), opt, donate=False)
    new, _, _ = step(variables, delta, jpeft.init_opt_state(opt, delta), batch, jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, new["lora"], delta["lora"])
    assert not np.allclose(new["head"]["params"]["classifier"]["kernel"],
                           delta["head"]["params"]["classifier"]["kernel"])


def test_loss_decreases(lora_head):
    model, variables, _loss, method, delta, batch = lora_head
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(_loss(model, method), opt)
    state = jpeft.init_opt_state(opt, delta)
    losses = []
    for i in range(20):
        delta, state, m = step(variables, delta, state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0]


def test_shardings_must_be_given_together():
    with pytest.raises(ValueError, match="together"):
        jpeft.make_train_step(lambda *a: 0.0, optax.sgd(1.0), delta_shardings={})


def test_method_training_additions_are_folded_in(tiny_bert, tiny_batch, tiny_sites):
    """AdaLoRA declares its orthogonality penalty and rank allocator, diff pruning its L0
    penalty; make_train_step(method=...) adds the penalties to the loss and wraps the optimizer,
    so callers wire nothing by hand."""
    from jpeft.methods import adalora as ada
    from jpeft.methods import diff_pruning as dp
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.compose(
        adalora=jpeft.adalora(("query",), init_r=4, alpha=4, target_r=2, total_steps=6,
                              t_init=1, t_final=2),
        dp=jpeft.diff_pruning(("classifier",), lam=1e-3))
    delta = method.init(jax.random.key(0), variables, tiny_sites)
    batch = dict(tiny_batch, labels=np.array([0, 1, 1], np.int32))
    plain = lambda p, d, b, k: optax.softmax_cross_entropy_with_integer_labels(
        jpeft.wrap(model.apply, method, tiny_sites)(p, d, b["input_ids"], b["attention_mask"],
                                                    b["token_type_ids"]), b["labels"]).mean()
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(plain, opt, method=method, donate=False)
    state = jpeft.init_opt_state(opt, delta, method=method)
    assert isinstance(state, ada.AdaLoRAState)
    want = (ada.orthogonality_penalty(delta["adalora"], 0.5)
            + dp.l0_penalty(delta["dp"], 1e-3))
    d, state, m = step(variables, delta, state, batch, jax.random.key(0))
    np.testing.assert_allclose(m["penalty"], want, rtol=1e-5)
    np.testing.assert_allclose(m["loss"], plain(variables, delta, batch, None) + want, rtol=1e-5)
    for i in range(5):
        d, state, m = step(variables, d, state, batch, jax.random.key(i + 1))
    assert sum(ada.rank_pattern(d).values()) == 2 * 2       # the final budget: target_r per matrix
    with pytest.raises(ValueError, match="needs total_steps"):
        jpeft.init_opt_state(opt, delta, method=jpeft.adalora(("query",)))


# --------------------------------------------------------------------------------------------
# Non-finite steps are skipped

W0 = np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4)


def _ls_loss(params, delta, batch, key):
    del key
    pred = batch["x"] @ (params["w"] + delta["w"])
    # a finite loss (+ 0) with a NaN gradient when batch["root"] is 1: d sqrt(0 * w)/dw = inf * 0
    root = batch["root"]
    return jnp.mean((pred - batch["y"]) ** 2) + root * jnp.sqrt(jnp.sum(delta["w"] * 0.0) + 1 - root)


def _ls_batch(i, bad=None):
    r = np.random.default_rng(i)
    x, y = r.normal(size=(8, 6)).astype(np.float32), r.normal(size=(8, 4)).astype(np.float32)
    root = np.float32(0)
    if bad == "nan_input":
        x[3, 2] = np.nan
    elif bad == "inf_target":
        y[0, 0] = np.inf
    elif bad == "nan_gradient":
        root = np.float32(1)
    return {"x": x, "y": y, "root": root}


def _ls_run(batches, **kw):
    opt = optax.adam(1e-1)
    step = jpeft.make_train_step(_ls_loss, opt, **kw)
    delta = {"w": np.zeros((6, 4), np.float32)}
    state = jpeft.init_opt_state(opt, delta)
    seen = []
    for i, b in enumerate(batches):
        delta, state, m = step({"w": W0}, delta, state, b, jax.random.key(i))
        seen.append((bool(m["skipped"]), m["skipped_in_row"], m["skipped_total"]))
    return jax.tree.map(np.asarray, delta), jax.tree.map(np.asarray, state), seen


@pytest.mark.parametrize("bad", ["nan_input", "inf_target", "nan_gradient"])
def test_a_non_finite_step_is_skipped_exactly(bad):
    """A bad batch in the middle (NaN input, inf target, finite loss with a NaN gradient) changes
    nothing: the run equals the run without it, bit for bit, delta and optimizer state, with the
    default buffer donation; the skip is counted."""
    good = [_ls_batch(i) for i in range(4)]
    with_bad = good[:2] + [_ls_batch(9, bad)] + good[2:]
    d1, s1, seen = _ls_run(with_bad)
    d0, s0, _ = _ls_run(good)
    jax.tree.map(np.testing.assert_array_equal, d1, d0)
    jax.tree.map(np.testing.assert_array_equal, s1, s0)
    assert [x[0] for x in seen] == [False, False, True, False, False]
    assert seen[2][1:] == (1, 1) and seen[-1][1:] == (0, 1)
    assert np.all(d1["w"] != 0)                       # the good steps trained


def test_too_many_skips_in_a_row_stop_with_the_last_good_state():
    good = [_ls_batch(i) for i in range(2)]
    bad = [_ls_batch(9, "nan_input")] * 3
    d_good, s_good, _ = _ls_run(good)
    with pytest.raises(jpeft.NonFiniteError,
                       match="3 train steps in a row had a non-finite loss or gradient") as e:
        _ls_run(good + bad, max_skips_in_row=3)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, e.value.delta), d_good)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, e.value.opt_state),
                 s_good)
    _, _, seen = _ls_run(good + bad[:2] + good, max_skips_in_row=3)      # 2 in a row: goes on
    assert [x[2] for x in seen] == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="max_skips_in_row must be >= 1 or None, got 0"):
        jpeft.make_train_step(_ls_loss, optax.adam(1e-1), max_skips_in_row=0)


def test_skipping_off_lets_the_nan_through():
    opt = optax.adam(1e-1)
    step = jpeft.make_train_step(_ls_loss, opt, skip_nonfinite=False)
    delta = {"w": np.zeros((6, 4), np.float32)}
    delta, _, m = step({"w": W0}, delta, jpeft.init_opt_state(opt, delta),
                       _ls_batch(0, "nan_input"), jax.random.key(0))
    assert "skipped" not in m and np.all(np.isnan(np.asarray(delta["w"])))


def test_a_donated_delta_or_state_passed_again_is_a_clear_error():
    """The step donates the delta and optimizer state: passing the old ones again names the
    argument and leaf and says to use the returned ones (or donate=False), not XLA's
    'Buffer has been deleted or donated'; with donate=False the inputs stay usable."""
    opt = optax.adam(1e-1)
    step = jpeft.make_train_step(_ls_loss, opt)
    delta = {"w": jnp.zeros((6, 4), jnp.float32)}
    state = jpeft.init_opt_state(opt, delta)
    new_delta, new_state, _ = step({"w": W0}, delta, state, _ls_batch(0), jax.random.key(0))
    with pytest.raises(jpeft.DonatedBufferError,
                       match=r"delta\['w'\] has been deleted \(donated to an earlier call.*"
                             r"donate=False"):
        step({"w": W0}, delta, new_state, _ls_batch(1), jax.random.key(1))
    with pytest.raises(jpeft.DonatedBufferError, match=r"opt_state\S* has been deleted"):
        step({"w": W0}, new_delta, state, _ls_batch(1), jax.random.key(1))
    kept = jpeft.make_train_step(_ls_loss, opt, donate=False)
    delta = {"w": jnp.zeros((6, 4), jnp.float32)}
    state = jpeft.init_opt_state(opt, delta)
    d1, _, _ = kept({"w": W0}, delta, state, _ls_batch(0), jax.random.key(0))
    d2, _, _ = kept({"w": W0}, delta, state, _ls_batch(0), jax.random.key(0))
    np.testing.assert_array_equal(d1["w"], d2["w"])
    assert not delta["w"].is_deleted()
