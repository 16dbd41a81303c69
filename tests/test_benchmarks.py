"""The hand-written JAX floor of ``benchmarks/floor.py`` computes what jpeft computes, so the
benchmark's jpeft/floor ratios compare the same math (tiny BERT, padded batch)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.core import paths as paths_lib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import floor  # noqa: E402


def _floor_lora(delta):
    """jpeft's LoRA delta as the floor's ``{"<layer>/<module>": (A, B)}``."""
    out = {}
    for path, v in paths_lib.flatten(delta).items():
        key = f"{path[4]}/{'/'.join(path[5:-2])}"
        a, b = out.get(key, (None, None))
        out[key] = (v, b) if path[-1] == "lora_A" else (a, v)
    return out


@pytest.mark.parametrize("layout", floor.LAYOUTS)
def test_floor_equals_jpeft_logits_and_gradients(tiny_config, tiny_bert, tiny_batch, layout):
    model, params = tiny_bert
    variables = {"params": params}
    args = (tiny_batch["input_ids"], tiny_batch["attention_mask"])
    sites = jpeft.probe(model.apply, variables, *args)
    method = jpeft.lora("all-linear", rank=2, alpha=4.0, exclude=("classifier",))
    delta = jax.tree.map(lambda x: x + 0.05, method.init(jax.random.key(0), variables, sites))
    frozen, trainable = floor.init("lora_all_linear", params, rank=2)
    trainable = {"params": trainable["params"], "lora": _floor_lora(delta)}
    f = jax.jit(floor.logits_fn(heads=tiny_config.num_attention_heads, scale=2.0,
                                layout=layout))
    wrapped = jax.jit(jpeft.wrap(model.apply, method, sites))
    np.testing.assert_allclose(f(frozen, trainable, *args), wrapped(variables, delta, *args),
                               rtol=1e-5, atol=1e-6)
    g_floor = jax.jit(jax.grad(lambda t: jnp.sum(jnp.tanh(f(frozen, t, *args)))))(trainable)
    g_jpeft = jax.jit(jax.grad(lambda d: jnp.sum(jnp.tanh(wrapped(variables, d, *args)))))(delta)
    for key, (ga, gb) in _floor_lora(g_jpeft).items():
        np.testing.assert_allclose(g_floor["lora"][key][0], ga, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g_floor["lora"][key][1], gb, rtol=1e-4, atol=1e-6)


def test_floor_trainable_sets():
    params = {"bert": {"encoder": {"layer": {"0": {"attention": {"self": {
        "query": {"kernel": np.ones((4, 4)), "bias": np.ones(4)}}}}}}},
        "classifier": {"kernel": np.ones((4, 2)), "bias": np.ones(2)}}
    _, full = floor.init("full", params)
    _, bitfit = floor.init("bitfit", params)
    count = lambda t: sum(np.size(x) for x in jax.tree.leaves(t))
    assert count(full) == 16 + 4 + 8 + 2 and count(bitfit) == 4 + 8 + 2
    with pytest.raises(ValueError, match="unknown floor config"):
        floor.init("lora", params)
