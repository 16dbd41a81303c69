"""Frozen/trainable split, combine, and the parameter report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.core import paths


def test_split_combine_round_trip():
    tree = {"a": {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}, "c": jnp.arange(4.0)}
    sel = [("a", "b"), ("c",)]
    train, frozen = jpeft.split(tree, sel)
    assert train["a"]["w"] is None and frozen["a"]["b"] is None
    assert jpeft.num_params(train) == 7 and jpeft.num_params(frozen) == 6
    back = jpeft.combine(train, frozen)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), back, tree))


def test_combine_rejects_overlap():
    tree = {"a": jnp.ones(2)}
    with pytest.raises(ValueError, match="more than one"):
        jpeft.combine(tree, tree)


def test_param_report_percent():
    params = {"w": jnp.zeros((10, 10))}
    delta = {"w": jnp.zeros((5,))}
    rep = jpeft.param_report(params, delta)
    assert (rep.trainable, rep.base) == (5, 100)
    assert rep.percent == pytest.approx(5.0)
    assert "5" in str(rep) and "100" in str(rep)


def test_num_bytes_on_abstract_arrays():
    tree = {"a": jax.ShapeDtypeStruct((3, 4), jnp.float32), "b": np.zeros(2, np.int8)}
    assert jpeft.num_bytes(tree) == 3 * 4 * 4 + 2
    assert paths.flatten(tree).keys() == {("a",), ("b",)}


def test_compose_rejects_two_parts_training_the_same_leaf(tiny_bert):
    _, params = tiny_bert
    variables = {"params": params}
    bad = jpeft.compose(bitfit=jpeft.bitfit(), head=jpeft.full_finetune(("classifier",)))
    with pytest.raises(ValueError, match="'bitfit' and 'head' both adapt params/classifier/bias"):
        bad.init(jax.random.key(0), variables)
    ok = jpeft.compose(bitfit=jpeft.bitfit(exclude=("classifier",)),
                       head=jpeft.full_finetune(("classifier",)))
    delta = ok.init(jax.random.key(0), variables)
    n_bias = sum(x.size for p, x in paths.flatten(variables).items() if p[-1] == "bias")
    assert jpeft.num_params(delta) == n_bias + variables["params"]["classifier"]["kernel"].size


def test_compose_rejects_factors_on_a_trained_weight(tiny_bert, tiny_sites):
    _, params = tiny_bert
    bad = jpeft.compose(lora=jpeft.lora(("classifier",), rank=1),
                        head=jpeft.full_finetune(("classifier",)))
    with pytest.raises(ValueError, match="'lora' and 'head' both adapt params/classifier/kernel"):
        bad.init(jax.random.key(0), {"params": params}, tiny_sites)
