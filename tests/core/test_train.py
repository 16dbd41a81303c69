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
    assert set(metrics) == {"loss", "accuracy"}
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
