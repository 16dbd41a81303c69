"""Quantized bases (QLoRA): the linear weights stored int8 or NF4, the delta trained on top, each
result equal to the same method on the dequantized base (an independent path: dequantize, then
the plain model)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
import zoo
from conftest import perturb


def _bert(tiny_bert, tiny_batch):
    model, params = tiny_bert
    b = tiny_batch
    return model.apply, {"params": params}, (b["input_ids"], b["attention_mask"],
                                             b["token_type_ids"])


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_lora_on_a_quantized_bert_equals_lora_on_its_dequantized_base(scheme, tiny_bert,
                                                                      tiny_batch):
    apply, params, args = _bert(tiny_bert, tiny_batch)
    sites = jpeft.probe(apply, params, *args)
    qparams = jpeft.quantize_params(params, sites, scheme=scheme)
    enc = ("params", "bert", "encoder", "layer", "0")
    assert isinstance(jpeft.core.paths.get_path(qparams, enc + ("attention", "self", "query",
                                                               "kernel")), jpeft.QuantizedArray)
    head = qparams["params"]["classifier"]["kernel"]
    emb = qparams["params"]["bert"]["embeddings"]["word_embeddings"]["embedding"]
    assert not isinstance(head, jpeft.QuantizedArray) and not isinstance(emb, jpeft.QuantizedArray)
    assert jpeft.num_params(qparams) == jpeft.num_params(params)
    qapply = jpeft.dequantizing(apply)
    qsites = jpeft.probe(qapply, qparams, *args)
    method = jpeft.lora(("query", "value"), rank=4, alpha=8)
    delta = perturb(method.init(jax.random.key(0), qparams, qsites))
    base = jpeft.dequantize_params(qparams)
    assert jax.tree.structure(base) == jax.tree.structure(params)
    want = apply(method.merge(base, delta, sites), *args)
    f = jpeft.wrap(qapply, method, qsites)
    np.testing.assert_allclose(jax.jit(f)(qparams, delta, *args), want, rtol=1e-4, atol=1e-5)
    g = jax.grad(lambda d: jnp.sum(f(qparams, d, *args) ** 2))(delta)
    g_ref = jax.grad(lambda d: jnp.sum(apply(method.merge(base, d, sites), *args) ** 2))(delta)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)
    with pytest.raises(ValueError, match=r"query/kernel is a quantized weight.*dequantize_params"):
        method.merge(qparams, delta, qsites)


def test_stored_bytes():
    """int8: 4x fewer bytes than float32 (up to the per-channel scales); NF4 with double
    quantization 4 + 8 / 64 bits per entry plus one float32 second-level scale per 256 blocks of
    a row (at least one per row) and the offset: 4.127 bits per entry (7.75x fewer) on rows of
    16384, 4.19 (7.64x) on rows of 512."""
    w = {"w": jax.random.normal(jax.random.key(0), (256, 512))}
    sites = jpeft.probe(lambda v, x: jnp.tanh(x @ v["w"]) * x[:, :1], w, jnp.ones((2, 256)))
    f32 = jpeft.num_bytes(w)
    int8 = jpeft.num_bytes(jpeft.quantize_params(w, sites, scheme="int8"))
    nf4 = jpeft.num_bytes(jpeft.quantize_params(w, sites, scheme="nf4"))
    assert int8 == 256 * 512 + 4 * 512 and 3.9 < f32 / int8 < 4.0
    # codes [256, 256] bytes, scales [256, 8] bytes, scale_scales [256, 1] float32, offset
    assert nf4 == 256 * 256 + 256 * 8 + 4 * 256 + 4 and 7.6 < f32 / nf4 < 7.7
    wide = {"w": jax.ShapeDtypeStruct((64, 16384), jnp.float32)}
    sites = jpeft.probe(lambda v, x: jnp.tanh(x @ v["w"]) * x[:, :1], wide,
                        jax.ShapeDtypeStruct((2, 64), jnp.float32))
    nf4 = jpeft.num_bytes(jax.eval_shape(lambda v: jpeft.quantize_params(v, sites), wide))
    assert nf4 == 64 * 8192 + 64 * 256 + 4 * 64 + 4 and 7.7 < 64 * 16384 * 4 / nf4 < 7.8


def test_adapters_and_ia3_train_on_a_quantized_base(tiny_bert, tiny_batch):
    """Methods acting on activations (IA3's rescaling, Houlsby adapters) on the quantized base
    equal the same methods on its dequantized base."""
    apply, params, args = _bert(tiny_bert, tiny_batch)
    sites = jpeft.probe(apply, params, *args)
    qparams = jpeft.quantize_params(params, sites, scheme="nf4")
    qapply = jpeft.dequantizing(apply)
    qsites = jpeft.probe(qapply, qparams, *args)
    base = jpeft.dequantize_params(qparams)
    for method in (jpeft.ia3(), jpeft.houlsby(reduction_factor=8)):
        delta = perturb(method.init(jax.random.key(0), qparams, qsites))
        got = jax.jit(jpeft.wrap(qapply, method, qsites))(qparams, delta, *args)
        want = jpeft.wrap(apply, method, sites)(base, delta, *args)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_qlora_on_the_nnx_decoder_trains_and_round_trips(tmp_path):
    """All-linear LoRA on the NF4 NNX decoder: equal to LoRA on the dequantized base, a jitted
    train step lowers the loss (only float32 factors trained), and the saved delta reloads on the
    quantized base exactly."""
    s = zoo.build("nnx_decoder")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    qparams = jpeft.quantize_params(s.params, sites, scheme="nf4", block_size=16)
    qapply = jpeft.dequantizing(s.apply)
    qsites = jpeft.probe(qapply, qparams, *s.args)
    report = lambda p, st: jpeft.methods.lora.report(p, st)
    assert report(qparams, qsites).chosen == report(s.params, sites).chosen   # no head, no embed
    method = jpeft.lora("all-linear", rank=2, alpha=4)
    delta = method.init(jax.random.key(0), qparams, qsites)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(delta))
    base = jpeft.dequantize_params(qparams)
    f = jpeft.wrap(qapply, method, qsites)
    d1 = perturb(delta)
    np.testing.assert_allclose(f(qparams, d1, *s.args),
                               s.apply(method.merge(base, d1, sites), *s.args),
                               rtol=1e-4, atol=1e-4)
    ids = s.args[0]

    def loss(params, delta, batch, key):
        logits = f(params, delta, batch)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]).mean()
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss, opt)
    state = opt.init(delta)
    first = float(loss(qparams, delta, ids, None))
    for i in range(5):
        delta, state, metrics = step(qparams, delta, state, ids, jax.random.key(i))
    assert float(loss(qparams, delta, ids, None)) < first
    jpeft.save(tmp_path / "adapter", method, delta)
    loaded = jpeft.load(tmp_path / "adapter", qparams, qsites)
    jax.tree.map(np.testing.assert_array_equal, loaded.delta, delta)


def test_rematerialising_the_dequantized_weights_changes_no_result(tiny_bert, tiny_batch):
    """``dequantizing(remat="dots")`` (default: weights dequantized again in the backward pass)
    and ``remat=None`` (kept) give the same outputs and gradients."""
    apply, params, args = _bert(tiny_bert, tiny_batch)
    sites = jpeft.probe(apply, params, *args)
    qparams = jpeft.quantize_params(params, sites, scheme="int8")
    method = jpeft.lora(("query", "value"), rank=2)
    out = []
    for remat in ("dots", None):
        qapply = jpeft.dequantizing(apply, remat=remat)
        qsites = jpeft.probe(qapply, qparams, *args)
        delta = perturb(method.init(jax.random.key(0), qparams, qsites))
        f = jpeft.wrap(qapply, method, qsites)
        out.append(jax.jit(jax.value_and_grad(lambda d: jnp.sum(f(qparams, d, *args) ** 2)))(delta))
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 out[0][1], out[1][1])
    with pytest.raises(ValueError, match="remat must be one of"):
        jpeft.dequantizing(apply, remat="everything")


def test_dequantized_weights_take_the_given_shardings(mesh):
    """``dequantizing(shardings=...)``: each dequantized weight is constrained to the sharding of
    its full-precision path (the same values; the layout visible in the lowered program); a
    quantized weight missing from the shardings is an error naming it."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    s = zoo.build("nnx_decoder")
    sites = jpeft.probe(s.apply, s.params, *s.args)
    qparams = jpeft.quantize_params(s.params, sites, scheme="nf4", block_size=16)
    rows = lambda x: NamedSharding(mesh, P("model") if x.ndim == 2 and x.shape[0] % 4 == 0
                                   else P())
    shardings = jax.tree.map(rows, s.params)
    sharded = jpeft.dequantizing(s.apply, shardings=shardings)
    np.testing.assert_allclose(jax.jit(sharded)(qparams, *s.args),
                               jpeft.dequantizing(s.apply)(qparams, *s.args), rtol=1e-4,
                               atol=1e-6)      # sharded sums: float32 reassociation
    hlo = jax.jit(sharded).lower(qparams, *s.args).as_text()
    assert "sharding_constraint" in hlo or "mhlo.sharding" in hlo
    first = next(p for p, x in jpeft.core.paths.flatten(qparams).items()
                 if jpeft.core.paths.is_array_node(x))
    flat = jpeft.core.paths.flatten(shardings)
    del flat[first]
    with pytest.raises(ValueError, match=r"no sharding for the quantized weight "
                                         + jpeft.core.paths.path_str(first)):
        jpeft.dequantizing(s.apply, shardings=jpeft.core.paths.unflatten(flat))(qparams, *s.args)
