"""The JAX floor: the benchmark's train steps written by hand in plain ``jax.numpy``, no jpeft.

The same math as ``jpeft.wrap(BertForSequenceClassification.apply, method)`` on the embedded
MiniLM (post-LN BERT, exact GELU, softmax in float32, mean pooling, 2-label head), written the
way a user would write it without a library: the frozen weights passed as one argument, the
trainable ones as another, LoRA inline (``y = x W + b + s (x A) B``), ``jax.value_and_grad``
over the trainable tree only, ``optax.adamw`` on it, both buffers donated.

Activations are kept as ``[B*T, H]`` matrices (``layout="flat"``, the default): every linear map
is a 2-D matrix product, the form XLA:CPU compiles best. ``layout="batched"`` keeps ``[B, T, H]``
and writes ``x @ W`` on the 3-D array, as most JAX model code does; differentiating that through
a rank-8 LoRA product makes XLA:CPU transpose the ``[B*T, O]`` cotangent inside an elementwise
fusion (see ``benchmarks/README.md``), so it is reported as a second, naive floor.

Trees use the Flax parameter names of :mod:`jpeft.models.bert` (``params["bert"]["encoder"]
["layer"]["0"]["attention"]["self"]["query"]["kernel"]``, ...) only so that both sides start
from one checkpoint; nothing here imports jpeft.

Configurations (:data:`CONFIGS`): ``full`` (every parameter), ``bitfit`` (every bias, LayerNorm
biases included, + the classifier), ``lora_qv`` (LoRA on query, value + classifier),
``lora_all_linear`` (LoRA on the six 2-D kernels of every layer + classifier).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

CONFIGS = ("full", "bitfit", "lora_qv", "lora_all_linear")
QV = ("attention/self/query", "attention/self/value")
ALL_LINEAR = ("attention/self/query", "attention/self/key", "attention/self/value",
              "attention/output/dense", "intermediate/dense", "output/dense")


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _layer_norm(x, p, eps):
    """One pass over ``x`` for both moments: ``var = E[x^2] - E[x]^2`` (clipped at 0)."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean))
    return (x - mean) * (jax.lax.rsqrt(var + eps) * p["scale"]) + p["bias"]


LAYOUTS = ("flat", "batched")


def forward(p: dict, lora: dict, scale: float, input_ids, attention_mask, *, heads: int,
            eps: float = 1e-12, layout: str = "flat") -> jax.Array:
    """Logits ``[B, 2]``. ``p``: the full Flax parameter tree (``{"bert": ..., "classifier":
    ...}``); ``lora``: ``{"<layer>/<module path>": (A [in, r], B [r, out])}``; ``layout``: one of
    :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    bert = p["bert"]
    emb = bert["embeddings"]
    b, t = input_ids.shape
    x = (emb["word_embeddings"]["embedding"][input_ids]
         + emb["position_embeddings"]["embedding"][jnp.arange(t)][None]
         + emb["token_type_embeddings"]["embedding"][jnp.zeros_like(input_ids)])
    x = _layer_norm(x, emb["LayerNorm"], eps)
    hidden = x.shape[-1]
    if layout == "flat":
        x = x.reshape(b * t, hidden)
    bias = ((1.0 - attention_mask.astype(jnp.float32)) * jnp.finfo(jnp.float32).min
            )[:, None, None, :]
    d = hidden // heads

    layers = bert["encoder"]["layer"]
    for i in sorted(layers, key=int):
        lp = layers[i]

        def dense(h, name, lp=lp, i=i):
            q = _get(lp, name)
            y = h @ q["kernel"] + q["bias"]
            if f"{i}/{name}" in lora:
                a, bb = lora[f"{i}/{name}"]
                y = y + scale * ((h @ a) @ bb)
            return y

        split = lambda y: y.reshape(b, t, heads, d)
        q = split(dense(x, "attention/self/query"))
        k = split(dense(x, "attention/self/key"))
        v = split(dense(x, "attention/self/value"))
        s = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(d) + bias
        ctx = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(s, axis=-1), v).reshape(x.shape)
        a = _layer_norm(dense(ctx, "attention/output/dense") + x,
                        lp["attention"]["output"]["LayerNorm"], eps)
        h = dense(a, "intermediate/dense")
        h = 0.5 * h * (1 + jax.lax.erf(h * math.sqrt(0.5)))          # exact GELU, torch's form
        x = _layer_norm(dense(h, "output/dense") + a, lp["output"]["LayerNorm"], eps)
    x = x.reshape(b, t, hidden)
    m = attention_mask.astype(x.dtype)[..., None]
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    c = p["classifier"]
    return pooled @ c["kernel"] + c["bias"]


def _merge(frozen, trainable):
    """The full tree from its frozen part and its trainable part (``None`` holes)."""
    return jax.tree.map(lambda f, t: f if t is None else t, frozen, trainable,
                        is_leaf=lambda x: x is None)


def _split(params, keep: Callable[[tuple[str, ...]], bool]):
    """``(frozen, trainable)``: each the tree with ``None`` where the other holds the leaf."""
    def pick(want):
        return jax.tree_util.tree_map_with_path(
            lambda kp, v: v if keep(tuple(k.key for k in kp)) == want else None, params)
    return pick(False), pick(True)


def init(config: str, params: dict, *, rank: int = 8, seed: int = 0):
    """``(frozen, trainable)`` for a configuration; LoRA's ``A`` Kaiming-uniform as in PEFT
    (``a = sqrt(5)``), ``B`` zero."""
    if config not in CONFIGS:
        raise ValueError(f"unknown floor config {config!r}; choose from {CONFIGS}")
    head = lambda path: path[0] == "classifier"
    if config == "full":
        frozen, train = _split(params, lambda path: True)
        return frozen, {"params": train, "lora": {}}
    if config == "bitfit":
        frozen, train = _split(params, lambda path: head(path) or path[-1] == "bias")
        return frozen, {"params": train, "lora": {}}
    frozen, train = _split(params, head)
    names = QV if config == "lora_qv" else ALL_LINEAR
    key = jax.random.key(seed)
    lora = {}
    for i in sorted(params["bert"]["encoder"]["layer"], key=int):
        for name in names:
            w = _get(params["bert"]["encoder"]["layer"][i], name)["kernel"]
            key, sub = jax.random.split(key)
            bound = 1.0 / math.sqrt(w.shape[0])       # kaiming_uniform(a=sqrt(5)) on [out, in]
            lora[f"{i}/{name}"] = (jax.random.uniform(sub, (w.shape[0], rank), w.dtype,
                                                      -bound, bound),
                                   jnp.zeros((rank, w.shape[1]), w.dtype))
    return frozen, {"params": train, "lora": lora}


def make_step(optimizer: optax.GradientTransformation, *, heads: int, scale: float,
              layout: str = "flat", compiler_options: dict | None = None):
    """``step(frozen, trainable, opt_state, batch) -> (trainable, opt_state, loss)``, jitted
    (with XLA ``compiler_options`` when given), ``trainable`` and ``opt_state`` donated."""
    def loss_fn(trainable, frozen, batch):
        p = _merge(frozen, trainable["params"])
        logits = forward(p, trainable["lora"], scale, batch["input_ids"],
                         batch["attention_mask"], heads=heads, layout=layout)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    def step(frozen, trainable, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(1, 2), compiler_options=compiler_options or None)


def logits_fn(*, heads: int, scale: float, layout: str = "flat"):
    """``f(frozen, trainable, input_ids, attention_mask) -> logits`` (for equality tests)."""
    def f(frozen, trainable, input_ids, attention_mask):
        return forward(_merge(frozen, trainable["params"]), trainable["lora"], scale, input_ids,
                       attention_mask, heads=heads, layout=layout)
    return f

