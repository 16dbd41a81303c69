"""Full training of selected leaves: the delta holds the trained values (replacing, not adding)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft.core import paths


def _loss_of(model, batch, labels):
    def loss(variables):
        logits = model.apply(variables, **batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss


def test_init_copies_the_selected_leaves_into_new_buffers(tiny_bert):
    _, params = tiny_bert
    variables = {"params": params}
    delta = jpeft.full_finetune(("classifier",)).init(jax.random.key(0), variables)
    flat, base = paths.flatten(delta), paths.flatten(variables)
    assert sorted(paths.path_str(p) for p in flat) == ["params/classifier/bias",
                                                       "params/classifier/kernel"]
    for p, x in flat.items():
        np.testing.assert_array_equal(x, base[p])
        assert x.dtype == base[p].dtype
        assert x.unsafe_buffer_pointer() != base[p].unsafe_buffer_pointer()
    everything = jpeft.full_finetune().init(jax.random.key(0), variables)
    assert jpeft.num_params(everything) == jpeft.num_params(variables)


def test_training_equals_adamw_on_the_weights_themselves(tiny_bert, tiny_batch):
    """Independent reference: optax.adamw (weight decay included) on the parameter tree itself,
    as PyTorch or a hand-written JAX step trains it. Three donated jpeft steps give the same
    weights; the base tree stays valid and unchanged."""
    model, params = tiny_bert
    variables = {"params": params}
    before = jax.tree.map(np.array, variables)
    labels = jnp.array([0, 1, 1])
    loss = _loss_of(model, tiny_batch, labels)
    opt = optax.adamw(1e-2, weight_decay=0.1)

    ref, ref_state = variables, opt.init(variables)
    for _ in range(3):
        g = jax.grad(loss)(ref)
        updates, ref_state = opt.update(g, ref_state, ref)
        ref = optax.apply_updates(ref, updates)

    method = jpeft.full_finetune()
    f = jpeft.wrap(model.apply, method)
    step = jpeft.make_train_step(
        lambda p, d, b, k: optax.softmax_cross_entropy_with_integer_labels(
            f(p, d, **tiny_batch), labels).mean(), opt)
    delta = method.init(jax.random.key(0), variables)
    state = opt.init(delta)
    for i in range(3):
        delta, state, _ = step(variables, delta, state, None, jax.random.key(i))
    for p, x in paths.flatten(ref).items():
        np.testing.assert_allclose(paths.flatten(delta)[p], x, rtol=1e-5, atol=1e-5,
                                   err_msg=paths.path_str(p))
    jax.tree.map(np.testing.assert_array_equal, variables, before)   # not donated away


def test_merge_replaces_and_equals_the_wrapped_forward(tiny_bert, tiny_batch):
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.full_finetune(("classifier", "pooler"), leaf_names=("kernel",))
    delta = method.init(jax.random.key(0), variables)
    np.testing.assert_array_equal(jpeft.wrap(model.apply, method)(variables, delta, **tiny_batch),
                                  model.apply(variables, **tiny_batch))
    trained = jax.tree.map(lambda x: 0.5 * x + 0.01, delta)
    merged = method.merge(variables, trained)
    flat_m, flat_d, flat_b = (paths.flatten(t) for t in (merged, trained, variables))
    for p, x in flat_m.items():
        np.testing.assert_array_equal(x, flat_d[p] if p in flat_d else flat_b[p])
    np.testing.assert_allclose(jpeft.wrap(model.apply, method)(variables, trained, **tiny_batch),
                               model.apply(merged, **tiny_batch), atol=1e-6)
    assert method.unmerge is None          # the replaced base values are gone from the merge
    assert jpeft.compose(lora=jpeft.lora(("query",), rank=2), head=method).unmerge is None


def test_a_float32_delta_trains_a_bfloat16_model(tiny_bert, tiny_batch):
    model, params = tiny_bert
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), {"params": params})
    method = jpeft.full_finetune(("classifier",))
    delta = jax.tree.map(lambda x: x.astype(jnp.float32) + 1e-3,
                         method.init(jax.random.key(0), half))
    merged = method.merge(half, delta)
    kernel = merged["params"]["classifier"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(kernel, delta["params"]["classifier"]["kernel"].astype(
        jnp.bfloat16))
    out = jpeft.wrap(model.apply, method)(half, delta, **tiny_batch)
    np.testing.assert_array_equal(out, model.apply(merged, **tiny_batch))


def test_targets_that_match_nothing_list_the_modules(tiny_bert):
    _, params = tiny_bert
    with pytest.raises(ValueError, match="classifer.*classifier"):
        jpeft.full_finetune(("classifer",)).init(jax.random.key(0), {"params": params})


def test_saved_config_rebuilds_it_and_the_delta_loads(tiny_bert, tmp_path):
    _, params = tiny_bert
    variables = {"params": params}
    method = jpeft.full_finetune(("classifier",), name="head")
    delta = jax.tree.map(lambda x: x + 1.0, method.init(jax.random.key(0), variables))
    jpeft.save(tmp_path / "head", method, delta)
    got = jpeft.load(tmp_path / "head", variables)
    assert got.method.config == json.loads(json.dumps(method.config))
    jax.tree.map(np.testing.assert_array_equal, got.method.merge(variables, got.delta),
                 method.merge(variables, delta))
