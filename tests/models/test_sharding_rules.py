"""Named sharding layouts of the reference models: every method's train step on meshes 1x8, 2x4
and 8x1 under each layout equals one device, and never all-gathers a base weight more than the
same step without a delta does."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jpeft
from jpeft.models import sharding_rules as rules
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM

# Sizes chosen so no factor or activation shape is the shape of (part of) a base weight.
CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_attention_heads=4,
              num_key_value_heads=2)
B, T = 8, 6


def _decoder(scan: bool):
    model = LlamaForCausalLM(LlamaConfig.tiny(**CONFIG, scan_layers=scan), rngs=nnx.Rngs(0))
    apply, params = jpeft.nnx.split(model)
    ids = np.random.default_rng(1).integers(1, CONFIG["vocab_size"], (B, T)).astype(np.int32)
    return apply, params, {"input_ids": ids}


METHODS = {
    "lora": lambda: jpeft.lora(("q_proj", "v_proj"), rank=3, alpha=8.0),
    "adalora": lambda: jpeft.adalora(("q_proj", "v_proj"), init_r=3, target_r=2, alpha=8.0,
                                     total_steps=20),
    "ia3": lambda: jpeft.ia3(),
    "houlsby": lambda: jpeft.houlsby(reduction_factor=12),        # bottleneck 5
    "prefix": lambda: jpeft.prefix_tuning(num_virtual_tokens=3),
    "prompt": lambda: jpeft.prompt_tuning(num_virtual_tokens=3),
    "full": lambda: jpeft.full_finetune(),
}


#: Positions a method adds to the model's forward (prompt tuning's virtual tokens).
LONGER = {"prompt": 3}


def _perturbed(method, params, sites):
    delta = method.init(jax.random.key(0), params, sites)
    leaves, tree = jax.tree.flatten(delta)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [
        x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
        if jnp.issubdtype(x.dtype, jnp.floating) else x for x, k in zip(leaves, keys)])


def _loss(apply, method, sites):
    f = jpeft.wrap(apply, method, sites)

    def loss(params, delta, batch, key):
        ids = batch["input_ids"]
        logits = f(params, delta, ids)
        logits = logits[0] if isinstance(logits, tuple) else logits
        t = ids.shape[1]
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, -t:][:, :-1], ids[:, 1:]).mean()
    return loss


def _run(apply, params, batch, method, mesh=None, layout=None, steps=2):
    """``steps`` SGD-with-momentum steps (linear in the gradient: float reordering stays small),
    on one device or sharded by ``layout`` on ``mesh``: ``(delta, losses, compiled text)``."""
    sites = jpeft.probe(apply, params, batch["input_ids"])
    opt = optax.sgd(0.1, momentum=0.9)
    delta = _perturbed(method, params, sites)
    loss = _loss(apply, method, sites)
    key = jax.random.key(3)
    if mesh is None:
        step = jpeft.make_train_step(loss, opt, method=method, donate=False)
        state = jpeft.init_opt_state(opt, delta, method=method)
        text = None
    else:
        p_sh = rules.param_shardings(params, mesh, "llama", layout)
        d_sh = jpeft.delta_shardings(method, p_sh, delta, sites)
        o_sh = jpeft.opt_state_shardings(jpeft.method_optimizer(method, opt), delta, d_sh, mesh)
        b_sh = rules.batch_shardings(batch, mesh, layout)
        params, delta, batch = (jax.device_put(params, p_sh), jax.device_put(delta, d_sh),
                                jax.device_put(batch, b_sh))
        state = jpeft.init_opt_state(opt, delta, o_sh, method=method)
        step = jpeft.make_train_step(loss, opt, method=method, donate=False,
                                     param_shardings=p_sh, delta_shardings=d_sh,
                                     opt_state_shardings=o_sh, batch_shardings=b_sh)
        text = step.lower(params, delta, state, batch, key).compile().as_text()
    losses = []
    for _ in range(steps):
        delta, state, m = step(params, delta, state, batch, key)
        losses.append(float(m["loss"]))
    return delta, losses, text


def _close(a, b, losses_a, losses_b):
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_specs_of_each_layout_on_both_models_and_stacked_layers(mesh):
    _, params, _ = _decoder(scan=True)
    sh = rules.param_shardings(params, mesh, "llama", "fsdp_tp")
    layers = sh["model"]["layers"]
    assert layers["self_attn"]["q_proj"]["kernel"].spec == P(None, "data", "model")
    assert layers["mlp"]["down_proj"]["kernel"].spec == P(None, "model", "data")
    assert layers["input_layernorm"]["scale"].spec == P()
    assert sh["model"]["embed_tokens"]["embedding"].spec == P(None, "data")
    assert sh["lm_head"]["kernel"].spec == P("data")
    _, flat, _ = _decoder(scan=False)
    tp = rules.param_shardings(flat, mesh, "llama", "tp")["model"]["layers"][0]
    assert tp["self_attn"]["k_proj"]["kernel"].spec == P(None, "model")
    assert tp["self_attn"]["o_proj"]["kernel"].spec == P("model")
    fsdp = rules.param_shardings(flat, mesh, "llama", "fsdp")["model"]["layers"][0]
    assert fsdp["mlp"]["gate_proj"]["kernel"].spec == P(("data", "model"))
    assert all(s.spec == P() for s in jax.tree.leaves(
        rules.param_shardings(flat, mesh, "llama", "dp")))
    from jpeft.models.bert import BertConfig, BertForSequenceClassification
    bert = BertForSequenceClassification(BertConfig.tiny(num_labels=2))
    variables = bert.init(jax.random.key(0), np.ones((2, 4), np.int32))
    layer = rules.param_shardings(variables, mesh, "bert", "tp")["params"]["bert"]["encoder"][
        "layer"]["0"]
    assert layer["attention"]["self"]["query"]["kernel"].spec == P(None, "model")
    assert layer["attention"]["output"]["dense"]["kernel"].spec == P("model")
    assert layer["output"]["dense"]["kernel"].spec == P("model")
    assert layer["intermediate"]["dense"]["kernel"].spec == P(None, "model")
    assert rules.batch_spec("fsdp") == P(("data", "model")) and rules.batch_spec("tp") == P("data")
    tall = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ("data", "model"))
    with pytest.raises(ValueError, match=r"q_proj/kernel \(3, 12, 64\): dimension 12 is not "
                                         r"divisible by mesh axes data of size 8"):
        rules.param_shardings({"model": {"layers": {"self_attn": {"q_proj": {"kernel": (
            jax.ShapeDtypeStruct((3, 12, 64), jnp.float32))}}}}}, tall, "llama", "fsdp_tp")
    with pytest.raises(ValueError, match=r"names mesh axes \['data', 'model'\] that the mesh"):
        rules.param_shardings(flat, jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",)),
                              "llama", "fsdp")
    with pytest.raises(ValueError, match="unknown layout 'zero3'"):
        rules.batch_spec("zero3")
    # A layout on other axis names (the planner's dp x fsdp x tp mesh).
    mine = rules.Layout(fsdp="fsdp", tp="tp", batch=("dp", "fsdp"))
    m3 = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("dp", "fsdp", "tp"))
    sh3 = rules.param_shardings(params, m3, "llama", mine)["model"]["layers"]
    assert sh3["self_attn"]["o_proj"]["kernel"].spec == P(None, "tp", "fsdp")
    assert rules.batch_spec(mine) == P(("dp", "fsdp"))


@pytest.mark.parametrize("shape", ["1x8", "2x4", "8x1"])
def test_lora_step_on_every_mesh_and_layout_equals_one_device(shape):
    meshes = rules.meshes(jax.devices()[:8]) if jax.device_count() >= 8 else {}
    if shape not in meshes:
        pytest.skip("needs 8 devices")
    apply, params, batch = _decoder(scan=True)
    method = METHODS["lora"]()
    ref, ref_losses, _ = _run(apply, params, batch, method)
    for layout in rules.LAYOUTS:
        got, losses, _ = _run(apply, params, batch, method, meshes[shape], layout)
        _close(ref, got, ref_losses, losses)


def _weight_gathers(text: str, params) -> int:
    """All-gathers in a compiled program whose result is (part of) a base matrix (a leaf the
    layouts shard: kernels and embeddings): its shape is the matrix's with each axis whole or
    divided by a mesh factor. (The sizes above keep factors and activations off these shapes.)"""
    shapes = set()
    for kp, x in jax.tree_util.tree_leaves_with_path(params):
        path = jpeft.core.paths.path_str(jpeft.core.paths.to_path(kp))
        if x.ndim >= 2 and rules._role("llama", path) is not None:
            *lead, m, n = x.shape
            for dm in (1, 2, 4, 8):
                for dn in (1, 2, 4, 8):
                    if m % dm == 0 and n % dn == 0:
                        shapes.add((*lead, m // dm, n // dn))
    count = 0
    for m in re.finditer(r"= f32\[([0-9,]*)\][^=]*? all-gather(-start)?\(", text):
        dims = tuple(int(d) for d in m.group(1).split(",") if d)
        count += dims in shapes
    return count


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_sharded_equals_one_device_with_no_extra_weight_gathers(mesh, name):
    """On the 2x4 mesh under FSDP + tensor parallelism: each method's step equals one device,
    its delta and optimizer state live on the mesh as derived from the weights, and its compiled
    step all-gathers base weights no more often than the step that trains only the first
    layer's norm (the same forward and backward through every layer, no delta)."""
    apply, params, batch = _decoder(scan=True)
    method = METHODS[name]()
    ref, ref_losses, _ = _run(apply, params, batch, method)
    got, losses, text = _run(apply, params, batch, method, mesh, "fsdp_tp")
    _close(ref, got, ref_losses, losses)
    assert all(isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
               for x in jax.tree.leaves(got))
    assert _weight_gathers(text, params) <= _baseline_gathers(mesh, LONGER.get(name, 0)), name


@functools.lru_cache(maxsize=None)
def _baseline_gathers(mesh, extra: int) -> int:
    """Base-weight all-gathers of the step that trains only the first layer's norm scale, on
    ``extra`` more positions (as many as the method's forward runs: XLA's partitioner picks its
    gathers by the activations' sizes)."""
    apply, params, batch = _decoder(scan=True)
    ids = batch["input_ids"]
    longer = {"input_ids": np.concatenate([ids[:, :extra], ids], axis=1)}
    base = jpeft.full_finetune(("model/layers/input_layernorm",))
    _, _, text = _run(apply, params, longer, base, mesh, "fsdp_tp", steps=1)
    return _weight_gathers(text, params)


def test_activation_sharding_pins_the_batch_axis_only_inside_its_context(mesh):
    x = jnp.ones((8, 4, 16))
    assert rules.constrain(x) is x                              # no context: unchanged
    apply, params, batch = _decoder(scan=True)
    f = jax.jit(lambda p, ids: apply(p, ids))
    plain = f.lower(params, batch["input_ids"]).as_text()
    with rules.activation_sharding(mesh, "fsdp_tp"):
        pinned = jax.jit(lambda p, ids: apply(p, ids)).lower(params, batch["input_ids"]).as_text()
    count = lambda t: t.count("sharding_constraint") + t.count("@Sharding")
    assert count(plain) == 0 and count(pinned) >= 3     # embeddings, the layer body, the logits
    with pytest.raises(ValueError, match="unknown layout"):
        with rules.activation_sharding(mesh, "zero3"):
            pass


def test_quantized_base_shards_like_the_weights_and_trains_on_the_mesh(mesh):
    """QLoRA: ``param_shardings`` of an NF4 base gives each stored array the weight's own spec
    (the last axis where each shard holds whole blocks of 16 and whole bytes, whole on every
    device otherwise; the second-level scales on the leading axes); all-linear LoRA on it, sharded
    on the 2x4 mesh under fsdp_tp, equals one device, and its compiled step gathers neither a
    stored array nor a base weight more often than the full-precision baseline."""
    apply, params, batch = _decoder(scan=True)
    sites = jpeft.probe(apply, params, batch["input_ids"])
    qparams = jpeft.quantize_params(params, sites, scheme="nf4", block_size=16)
    sh = rules.param_shardings(qparams, mesh, "llama", "fsdp_tp")
    layers = sh["model"]["layers"]
    attn, mlp = layers["self_attn"], layers["mlp"]
    assert isinstance(attn["q_proj"]["kernel"], jpeft.QuantizedArray)
    # column [L, 64, 64] over (data, model): 16 columns per shard, one block
    assert attn["q_proj"]["kernel"].codes.spec == P(None, "data", "model")
    assert attn["q_proj"]["kernel"].scales.spec == P(None, "data", "model")
    assert attn["q_proj"]["kernel"].scale_scales.spec == P(None, "data")
    assert attn["q_proj"]["kernel"].scale_offset.spec == P()
    # row [L, 160, 64] over (model, data): 32 columns per shard, two blocks
    assert mlp["down_proj"]["kernel"].codes.spec == P(None, "model", "data")
    # [L, 64, 32] (8 columns per shard) and [L, 64, 160] (40): a shard would cut a block
    assert attn["k_proj"]["kernel"].codes.spec == P(None, "data")
    assert mlp["gate_proj"]["kernel"].scales.spec == P(None, "data")
    assert layers["input_layernorm"]["scale"].spec == P()

    method = jpeft.lora("all-linear", rank=3, alpha=8.0)
    ref, ref_losses, _ = _run(jpeft.dequantizing(apply, remat=None), qparams, batch, method)
    full_sh = rules.param_shardings(params, mesh, "llama", "fsdp_tp")
    qapply = jpeft.dequantizing(apply, remat=None, shardings=full_sh)
    qsites = jpeft.probe(qapply, qparams, batch["input_ids"])
    opt = optax.sgd(0.1, momentum=0.9)
    delta = _perturbed(method, qparams, qsites)
    d_sh = jpeft.delta_shardings(method, full_sh, delta, qsites)
    o_sh = jpeft.opt_state_shardings(jpeft.method_optimizer(method, opt), delta, d_sh, mesh)
    b_sh = rules.batch_shardings(batch, mesh, "fsdp_tp")
    step = jpeft.make_train_step(_loss(qapply, method, qsites), opt, method=method, donate=False,
                                 param_shardings=sh, delta_shardings=d_sh,
                                 opt_state_shardings=o_sh, batch_shardings=b_sh)
    p, d, b = (jax.device_put(qparams, sh), jax.device_put(delta, d_sh),
               jax.device_put(batch, b_sh))
    assert p["model"]["layers"]["self_attn"]["q_proj"]["kernel"].codes.sharding == (
        attn["q_proj"]["kernel"].codes)
    state = jpeft.init_opt_state(opt, d, o_sh, method=method)
    key = jax.random.key(3)
    text = step.lower(p, d, state, b, key).compile().as_text()
    losses = []
    for _ in range(2):
        d, state, m = step(p, d, state, b, key)
        losses.append(float(m["loss"]))
    _close(ref, d, ref_losses, losses)
    assert not re.search(r"= u8\[[0-9,]*\][^=]*? all-gather", text)     # no codes gathered
    assert _weight_gathers(text, params) <= _baseline_gathers(mesh, 0)
