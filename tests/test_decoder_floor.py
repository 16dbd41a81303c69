"""The hand-written decoder floor of ``benchmarks/decoder_floor.py`` computes what jpeft computes
on the NNX LLaMA (tiny config, right-padded batch), so ``isolated.py --model decoder``'s
jpeft/floor ratios compare the same math: logits, loss and gradients against
``LlamaForCausalLM`` under ``jpeft.wrap``, and one train step of each configuration."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.core import paths as paths_lib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import decoder_cost  # noqa: E402
import decoder_floor  # noqa: E402


@pytest.fixture(scope="module")
def model():
    """``decoder_cost.py``'s tiny decoder with weights ``N(0, 0.2)`` instead of ``N(0, 0.02)``:
    attention scores of order one, so that a wrong rotation or mask moves the logits by far more
    than the tolerance (with ``N(0, 0.02)`` a flipped rotation moves them by 5e-3 only)."""
    return decoder_cost._build_model({**decoder_cost.QUICK_MODEL, "initializer_range": 0.2}, 0,
                                     "unrolled")


@pytest.fixture(scope="module")
def batch():
    """``[3, 12]`` int32, real lengths 12, 7 and 3 (padding id 0 on the right)."""
    b, t, lengths = 3, 12, (12, 7, 3)
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.random.default_rng(0).integers(1, decoder_cost.QUICK_MODEL["vocab_size"], (b, t))
    return {"input_ids": jnp.asarray(ids * mask, jnp.int32), "attention_mask": jnp.asarray(mask)}


def _floor_lora(delta) -> dict:
    """jpeft's LoRA delta (``model/layers/<i>/<group>/<proj>/kernel/{lora_A, lora_B}``) as the
    floor's ``{"<i>/<proj>": (A, B)}``."""
    out = {}
    for path, v in paths_lib.flatten(delta).items():
        key = f"{path[2]}/{path[4]}"
        a, b = out.get(key, (None, None))
        out[key] = (v, b) if path[-1] == "lora_A" else (a, v)
    return out


def _perturbed(tree, seed: int):
    """Every leaf plus ``N(0, 0.05)`` noise (LoRA's ``B`` starts at zero)."""
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tdef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _close(actual, desired, rtol=1e-5):
    """Equal to ``rtol`` relative to the largest entry of ``desired``."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * np.abs(desired).max())


def test_floor_logits_equal_llama_on_a_padded_batch(model, batch):
    weights = decoder_floor.weights_from_params(jpeft.nnx.split(model)[1])
    d = decoder_floor.dims(model.config)
    ours = jax.jit(lambda w, ids, m: decoder_floor.forward(w, {}, 1.0, ids, m, d))(
        weights, batch["input_ids"], batch["attention_mask"])
    theirs = model(batch["input_ids"], batch["attention_mask"])
    assert ours.shape == theirs.shape == (3, 12, decoder_cost.QUICK_MODEL["vocab_size"])
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", decoder_floor.CONFIGS)
def test_floor_loss_and_gradients_equal_jpeft(model, batch, config):
    """A non-zero delta (LoRA: the same ``A``, ``B`` on both sides; full: perturbed weights):
    the same loss, and the same gradient of every trainable entry."""
    apply, params = jpeft.nnx.split(model)
    args = (batch["input_ids"], batch["attention_mask"])
    sites = jpeft.probe(apply, params, *args)
    method = decoder_cost._configs()[config]["method"]()
    delta = _perturbed(method.init(jax.random.key(3), params, sites), 4)
    f = jpeft.wrap(apply, method, sites)
    jpeft_loss, g_jpeft = jax.jit(jax.value_and_grad(
        lambda dl: decoder_cost.causal_lm_loss(f(params, dl, *args), *args)))(delta)

    d = decoder_floor.dims(model.config)
    frozen, _ = decoder_floor.init(config, decoder_floor.weights_from_params(params))
    if config == "full":
        trainable = {"weights": decoder_floor.weights_from_params(delta), "lora": {}}
    else:
        trainable = {"weights": {}, "lora": _floor_lora(delta)}
    scale = decoder_cost.ALPHA / decoder_cost.RANK
    floor_loss, g_floor = jax.jit(jax.value_and_grad(
        lambda t: decoder_floor.loss_fn(t, frozen, batch, d, scale)))(trainable)

    base_loss = decoder_floor.loss_fn({"weights": {}, "lora": {}},
                                      decoder_floor.weights_from_params(params), batch, d, scale)
    assert abs(float(jpeft_loss) - float(base_loss)) > 1e-3      # the delta matters
    np.testing.assert_allclose(floor_loss, jpeft_loss, rtol=1e-5)
    if config == "full":
        expected = {"weights": decoder_floor.weights_from_params(g_jpeft), "lora": {}}
    else:
        expected = {"weights": {}, "lora": _floor_lora(g_jpeft)}
    assert jax.tree.structure(g_floor) == jax.tree.structure(expected)
    jax.tree.map(_close, g_floor, expected)


@pytest.mark.parametrize("config", decoder_floor.CONFIGS)
def test_floor_step_trains_only_the_trainable_part(model, batch, config):
    """One step: a finite loss equal to the base model's (LoRA's ``B`` is zero at first), as many
    trainable entries as jpeft's delta of the configuration, every ``B`` (every weight with
    ``full``) moved, the frozen weights left as they were."""
    apply, params = jpeft.nnx.split(model)
    sites = jpeft.probe(apply, params, batch["input_ids"], batch["attention_mask"])
    delta = decoder_cost._configs()[config]["method"]().init(jax.random.key(1), params, sites)
    weights = decoder_floor.weights_from_params(params)
    frozen, trainable = decoder_floor.init(config, weights)
    trainable = jax.tree.map(jnp.copy, trainable)
    assert jpeft.num_params(trainable) == jpeft.num_params(delta)
    before = jax.tree.map(np.asarray, (frozen, trainable))

    d = decoder_floor.dims(model.config)
    opt = decoder_cost._optimizer()
    step = decoder_floor.make_step(opt, d, decoder_cost.ALPHA / decoder_cost.RANK)
    after, _, loss = step(frozen, trainable, opt.init(trainable), batch)
    base = decoder_floor.loss_fn({"weights": {}, "lora": {}}, weights, batch, d, 1.0)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(loss, base, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, frozen, before[0])
    assert jax.tree.structure(after) == jax.tree.structure(before[1])
    moved = after["lora"] if config != "full" else after["weights"]
    was = before[1]["lora"] if config != "full" else before[1]["weights"]
    if config != "full":        # B only: A's gradient is zero while B is
        moved = {k: v[1] for k, v in moved.items()}
        was = {k: v[1] for k, v in was.items()}
    for new, old in zip(jax.tree.leaves(moved), jax.tree.leaves(was)):
        assert not np.array_equal(np.asarray(new), old)


def test_floor_refuses_what_it_does_not_write(model):
    import dataclasses
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        decoder_floor.dims(dataclasses.replace(model.config, tie_word_embeddings=True))
    with pytest.raises(ValueError, match="unknown decoder floor config"):
        decoder_floor.init("bitfit", {"layers": []})
