"""Delta checkpoints: round trip, only the delta on disk, shape errors, exact resume."""

import os

import jax
import numpy as np
import optax
import pytest

import jpeft
from jpeft import checkpoint


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def lora_setup(tiny_bert, tiny_batch, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.lora(("query", "value"), rank=2)
    delta = jax.tree.map(lambda x: x + 0.05, method.init(jax.random.key(0), variables, tiny_sites))
    return model, variables, method, delta, tiny_batch, tiny_sites


def test_round_trip_reproduces_outputs(lora_setup, tmp_path):
    model, variables, method, delta, batch, sites = lora_setup
    checkpoint.save(tmp_path / "ck", delta, metadata={"config": method.config})
    like = jax.eval_shape(lambda k, v: method.init(k, v, sites), jax.random.key(0), variables)
    got = checkpoint.restore(tmp_path / "ck", like)
    jax.tree.map(np.testing.assert_array_equal, got["delta"], delta)
    assert got["metadata"]["config"]["rank"] == 2 and got["step"] is None
    f = jpeft.wrap(model.apply, method, sites)
    np.testing.assert_array_equal(f(variables, got["delta"], **batch), f(variables, delta, **batch))
    # Only the delta is stored: far less than the base weights.
    assert _dir_bytes(tmp_path / "ck") < jpeft.num_bytes(variables) / 4


def test_shape_mismatch_names_the_entry(lora_setup, tmp_path):
    _, variables, _, delta, _, sites = lora_setup
    checkpoint.save(tmp_path / "ck", delta)
    shapes = lambda m: jax.eval_shape(lambda k, v: m.init(k, v, sites), jax.random.key(0), variables)
    like = shapes(jpeft.lora(("query", "value"), rank=3))
    with pytest.raises(ValueError, match=r"query/kernel/lora_A: checkpoint has shape \(32, 2\), expected \(32, 3\)"):
        checkpoint.restore(tmp_path / "ck", like)
    like = shapes(jpeft.lora(("query",), rank=2))
    with pytest.raises(ValueError, match="not expected: delta/.*value"):
        checkpoint.restore(tmp_path / "ck", like)


def test_refuses_to_overwrite_and_missing_dir(lora_setup, tmp_path):
    _, _, _, delta, _, _ = lora_setup
    checkpoint.save(tmp_path / "ck", delta)
    with pytest.raises(Exception):
        checkpoint.save(tmp_path / "ck", delta)
    checkpoint.save(tmp_path / "ck", delta, overwrite=True)
    with pytest.raises(FileNotFoundError):
        checkpoint.restore(tmp_path / "nothing", delta)


def test_resumed_run_continues_exactly(lora_setup, tmp_path):
    model, variables, method, delta, batch, sites = lora_setup
    batch = dict(batch, labels=np.array([1, 0, 1], np.int32))
    f = jpeft.wrap(model.apply, method, sites)

    def loss(p, d, b, k):
        logits = f(p, d, b["input_ids"], b["attention_mask"], b["token_type_ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()
    opt = optax.adamw(1e-2)
    step = jpeft.make_train_step(loss, opt, donate=False)
    keys = [jax.random.key(i) for i in range(4)]

    d, s = delta, jpeft.init_opt_state(opt, delta)
    for k in keys:
        d, s, _ = step(variables, d, s, batch, k)
    straight = d

    d, s = delta, jpeft.init_opt_state(opt, delta)
    for k in keys[:2]:
        d, s, _ = step(variables, d, s, batch, k)
    checkpoint.save(tmp_path / "ck", d, opt_state=s, step=2)
    got = checkpoint.restore(tmp_path / "ck", delta, opt_state_like=s)
    assert got["step"] == 2
    d, s = got["delta"], got["opt_state"]
    for k in keys[got["step"]:]:
        d, s, _ = step(variables, d, s, batch, k)
    jax.tree.map(np.testing.assert_array_equal, d, straight)
