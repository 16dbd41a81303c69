"""A sharded LoRA train step on a 2x4 (data x model) mesh of 8 CPU devices equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jpeft

RULES = [
    (r".*/attention/self/(query|key|value)/kernel", P(None, "model")),
    (r".*/intermediate/dense/kernel", P(None, "model")),
    (r".*/(attention/output|[0-9]+/output)/dense/kernel", P("model", None)),
    (r".*/word_embeddings/embedding", P(None, "model")),
]


def _batch(config, n=8, t=10):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return {"input_ids": rng.integers(1, config.vocab_size, (n, t)).astype(np.int32) * mask,
            "attention_mask": mask, "token_type_ids": np.zeros((n, t), np.int32),
            "labels": rng.integers(0, 2, n).astype(np.int32)}


def _loss(model, method, sites):
    f = jpeft.wrap(model.apply, method, sites)

    def loss(params, delta, batch, key):
        logits = f(params, delta, batch["input_ids"], batch["attention_mask"],
                   batch["token_type_ids"], delta_rng=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss


def test_lora_delta_shardings_follow_the_weights(tiny_bert, tiny_sites, mesh):
    _, params = tiny_bert
    variables = {"params": params}
    shard = jpeft.shard_by_rules(variables, mesh, RULES)
    method = jpeft.lora(("query", "value", "output/dense"), rank=4)
    delta = jax.eval_shape(lambda k, v: method.init(k, v, tiny_sites), jax.random.key(0), variables)
    ds = jpeft.delta_shardings(method, shard, delta, tiny_sites)
    layer = ds["params"]["bert"]["encoder"]["layer"]["0"]
    q = layer["attention"]["self"]["query"]["kernel"]
    assert q["lora_A"].spec == P(None, None) and q["lora_B"].spec == P(None, "model")
    o = layer["output"]["dense"]["kernel"]
    assert o["lora_A"].spec == P("model", None) and o["lora_B"].spec == P(None, None)


def test_shard_by_rules_rejects_indivisible(mesh):
    with pytest.raises(ValueError, match="not divisible"):
        jpeft.shard_by_rules({"w": jnp.zeros((3, 6))}, mesh, [("w", P("model", None))])


def test_sharded_step_equals_single_device(tiny_bert, tiny_config, tiny_sites, mesh):
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.compose(lora=jpeft.lora(("query", "value", "intermediate/dense"), rank=4),
                           head=jpeft.full_finetune(("classifier",)))
    # SGD with momentum: optimizer state to shard, and an update that is linear in the gradient
    # (Adam's g / sqrt(v) would amplify float reordering noise in near-zero gradient entries).
    opt = optax.sgd(0.5, momentum=0.9)
    batch = _batch(tiny_config)
    loss = _loss(model, method, tiny_sites)
    delta0 = method.init(jax.random.key(0), variables, tiny_sites)
    keys = [jax.random.key(i) for i in range(3)]

    # Single device.
    step = jpeft.make_train_step(loss, opt, donate=False)
    d, s = delta0, jpeft.init_opt_state(opt, delta0)
    for k in keys:
        d, s, m1 = step(variables, d, s, batch, k)
    single = jax.tree.map(np.asarray, d)

    # 2 x 4 mesh: weights tensor-parallel on "model", batch data-parallel on "data".
    p_sh = jpeft.shard_by_rules(variables, mesh, RULES)
    d_sh = jpeft.delta_shardings(method, p_sh, delta0, tiny_sites)
    o_sh = jpeft.opt_state_shardings(opt, delta0, d_sh, mesh)
    b_sh = {k: NamedSharding(mesh, P("data")) for k in batch}
    sharded_vars = jax.device_put(variables, p_sh)
    d = jax.device_put(delta0, d_sh)
    s = jpeft.init_opt_state(opt, d, o_sh)
    step = jpeft.make_train_step(loss, opt, param_shardings=p_sh, delta_shardings=d_sh,
                                 opt_state_shardings=o_sh, batch_shardings=b_sh)
    sbatch = jax.device_put(batch, b_sh)
    for k in keys:
        d, s, m2 = step(sharded_vars, d, s, sbatch, k)

    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), atol=1e-5)
    for x, y in zip(jax.tree.leaves(single), jax.tree.leaves(d)):
        np.testing.assert_allclose(x, np.asarray(y), atol=1e-5, rtol=1e-5)
    # The delta stayed where the derivation put it, and the momentum with it.
    b = d["lora"]["params"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]["lora_B"]
    assert b.sharding.spec == P(None, "model")
    mu = s[0].trace["lora"]["params"]["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"]["lora_B"]
    assert mu.sharding.spec == P(None, "model")
    assert len(b.sharding.device_set) == 8


def test_replicated_puts_small_deltas_on_the_base_mesh(mesh):
    from jax.sharding import NamedSharding, PartitionSpec
    from jpeft.core import sharding
    base = {"w": NamedSharding(mesh, PartitionSpec("data")), "b": None}
    got = sharding.replicated(base, {"prefix": {"keys": 1, "values": 2}})
    assert got == {"prefix": {"keys": NamedSharding(mesh, PartitionSpec()),
                              "values": NamedSharding(mesh, PartitionSpec())}}
    assert sharding.replicated({"w": None}, {"a": 1}) == {"a": None}
