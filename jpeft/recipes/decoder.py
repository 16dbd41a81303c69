"""A small decoder example: a prefix or LoRA trained on shipped text changes what the decoder says.

No pretrained decoder ships with jpeft, so the example makes its own base model first:

1. a tiny LLaMA-style decoder (:mod:`jpeft.models.llama`, byte-level vocabulary of 256 + padding)
   is trained in full on the *negative* movie-review sentences (:mod:`jpeft.data.movies`) for
   ``base_steps`` steps: this is the frozen base;
2. a PEFT method (``"lora"`` on q, v; ``"prefix"``; any preset name of :func:`build`) is trained
   on the *positive* sentences only, the base frozen;
3. the example reports the positive sentences' per-byte loss under the base and the adapted
   model, and continuations of a few prompts before and after, generated with the KV cache
   (``jpeft.wrap`` around :func:`jpeft.models.llama.generate`): sampled at ``temperature`` from
   the ``top_k`` most likely bytes with one fixed key, so the base and the adapted model draw the
   same random numbers and differ only by the adapter (``temperature=0``: greedy, which on a model
   this small soon repeats itself: "the the the").

With ``quantize="nf4"`` or ``"int8"`` (the CLI's ``--quantize``) the trained base is stored
quantized before step 2 (:func:`jpeft.recipes.quantization.prepare`: its linear weights, not the
embeddings or the head) and the adapters train on top of it (QLoRA); the base's loss and
continuations are then those of the quantized base, and its full-precision loss is reported too.

Everything is jitted; on a 2-core CPU the defaults take about a minute.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jpeft.core import method as method_lib
from jpeft.core import sites as sites_lib
from jpeft.core import train as train_lib
from jpeft.core import tree as tree_lib

PAD = 256
PROMPTS = ("the film is", "it's a", "this movie")


def encode(texts, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of each text (lower-cased), cut or right-padded to ``length``: ``(ids, mask)``."""
    ids = np.full((len(texts), length), PAD, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for i, t in enumerate(texts):
        b = np.frombuffer(t.lower().encode("utf-8", "replace")[:length], np.uint8)
        ids[i, :b.size], mask[i, :b.size] = b, 1
    return ids, mask


def decode(ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", "replace")


#: The peak learning rate of each method's adapter training (``run(lr=None)``). Prefix: swept over
#: 5e-3 .. 0.3 on the defaults; held-out loss 2.171 -> 2.175 (5e-3), 2.169 (2e-2), 2.166 (5e-2),
#: 2.1645 (0.1), 2.1647 (0.3); reparametrised (MLP 64): 2.166 at 5e-3 and 2e-2. LoRA: 2.150.
LR = {"lora": 5e-3, "prefix": 1e-1, "ia3": 1e-2, "houlsby": 5e-3, "prompt": 3e-2}


def build(name: str, rank: int = 8, prefix_length: int = 8) -> method_lib.Method:
    """The adapter methods this example offers: ``"lora"`` (q, v), ``"prefix"``, ``"ia3"``,
    ``"houlsby"``, ``"prompt"``."""
    import jpeft
    from jpeft.methods import adapters, ia3, prefix, prompt
    table: dict[str, Callable[[], method_lib.Method]] = {
        "lora": lambda: jpeft.lora(("q_proj", "v_proj"), rank=rank, alpha=2.0 * rank),
        "prefix": lambda: prefix.prefix_tuning(prefix_length),
        "ia3": lambda: ia3.ia3(),
        "houlsby": lambda: adapters.houlsby(reduction_factor=4),
        "prompt": lambda: prompt.prompt_tuning(prefix_length),
    }
    if name not in table:
        raise ValueError(f"decoder example: unknown method {name!r}; choose from {sorted(table)}")
    return table[name]()


class Result(NamedTuple):
    """One method's outcome: held-out loss per byte under the base and adapted models, the
    continuations of :data:`PROMPTS` before and after (sampled with one key, or greedy), trainable entries, seconds (its training,
    evaluation and generation)."""
    base_loss: float
    adapted_loss: float
    before: list[str]
    after: list[str]
    trainable: int
    seconds: float


def _lm_loss(logits, ids, mask):
    """Mean next-byte cross-entropy over real tokens; ``logits`` may carry extra leading
    positions (prompt tuning): the last ``T`` are scored."""
    logits = logits[:, logits.shape[1] - ids.shape[1]:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    w = mask[:, 1:].astype(nll.dtype)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def _fit(f, params, delta, ids, mask, *, steps, lr, batch, seed, method=None):
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps),
                      weight_decay=0.0)
    step = train_lib.make_train_step(
        lambda p, d, b, k: _lm_loss(f(p, d, b["ids"], b["mask"]), b["ids"], b["mask"]), opt,
        method=method)
    state = train_lib.init_opt_state(opt, delta, method=method)
    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.integers(0, len(ids), batch)
        delta, state, _ = step(params, delta, state, {"ids": ids[idx], "mask": mask[idx]},
                               jax.random.key(i))
    return delta


def run(methods: str | Sequence[str] = "lora", *, base_steps: int = 300, steps: int = 200,
        length: int = 48, batch: int = 32, new_tokens: int = 24, lr: float | None = None,
        seed: int = 0, quantize: str = "none", temperature: float = 0.8,
        top_k: int | None = 20, log: Callable[[str], None] = print) -> dict[str, Result]:
    """The example (module docstring) for one method or several (names of :func:`build`), all on
    the same base; returns ``{name: Result}``. ``lr``: the adapters' peak learning rate (default
    :data:`LR` of each method); ``quantize``: how the base is stored while the adapters train
    (``"none"``, ``"nf4"``, ``"int8"``)."""
    import jpeft
    from jpeft.data.movies import load_movie_reviews
    from jpeft.models.llama import LlamaConfig, LlamaForCausalLM, generate
    from jpeft.recipes import quantization

    names = [methods] if isinstance(methods, str) else list(methods)
    for name in names:
        build(name)                          # an unknown name fails before anything trains
    quantization.check(quantize)
    t0 = time.perf_counter()
    texts, labels = load_movie_reviews()
    neg = [t for t, y in zip(texts, labels) if y == 0]
    pos = [t for t, y in zip(texts, labels) if y == 1]
    neg_ids, neg_mask = encode(neg, length)
    pos_ids, pos_mask = encode(pos, length)
    config = LlamaConfig.tiny(vocab_size=PAD + 1, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                              max_position_embeddings=length + new_tokens + 32)
    apply, params = jpeft.nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(seed)))

    # 1. the base model: every weight trained on the negative sentences
    full = jpeft.full_finetune()
    base_delta = full.init(jax.random.key(seed), params)
    base_delta = _fit(jax.jit(jpeft.wrap(apply, full)), params, base_delta, neg_ids, neg_mask,
                      steps=base_steps, lr=3e-3, batch=batch, seed=seed)
    params = jax.jit(full.merge)(params, base_delta)
    log(f"base decoder: {tree_lib.num_params(params):,} parameters, trained {base_steps} steps on "
        f"{len(neg)} negative sentences")
    sites = sites_lib.probe(apply, params, pos_ids[:2], pos_mask[:2])
    eval_ids, eval_mask = pos_ids[-256:], pos_mask[-256:]
    loss_of = lambda apply, params: float(jax.jit(
        lambda i, m: _lm_loss(apply(params, i, m), i, m))(eval_ids, eval_mask))
    full_loss = loss_of(apply, params)
    base = quantization.prepare(apply, params, sites, (pos_ids[:2], pos_mask[:2]), quantize)
    log(quantization.num_bytes(base.params).line(quantize))
    apply, params, sites = base.apply, base.params, base.sites
    base_loss = loss_of(apply, params)
    if quantize != "none":
        log(f"held-out positive sentences, loss per byte: full-precision base {full_loss:.3f}, "
            f"{quantize} base {base_loss:.3f} (the adapters train on the {quantize} base)")
    prompts, _ = encode(PROMPTS, max(len(p) for p in PROMPTS))
    left = np.full_like(prompts, PAD)          # left-padded prompts: generation continues each
    lmask = np.zeros_like(prompts)
    for i, p in enumerate(PROMPTS):
        left[i, -len(p):], lmask[i, -len(p):] = prompts[i, :len(p)], 1
    gen_apply, _ = jpeft.nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(seed)),
                                   method=lambda m, x, k: generate(
                                       m, x, k, new_tokens, temperature=temperature,
                                       top_k=top_k if temperature > 0 else None,
                                       key=jax.random.key(seed + 2),   # the same draws before
                                       pad_token_id=PAD))              # and after training
    gen_apply = base.wrap(gen_apply)
    plain = jax.jit(gen_apply)(params, left, lmask)
    before = [decode(np.asarray(r)[-new_tokens:]) for r in plain]

    results = {}
    for name in names:
        # 2. the adapter, trained on the positive sentences only
        t1 = time.perf_counter()
        method = build(name)
        rate = LR[name] if lr is None else lr
        delta = method.init(jax.random.key(seed + 1), params, sites)
        f = jax.jit(jpeft.wrap(apply, method, sites))
        delta = _fit(f, params, delta, pos_ids[:-256], pos_mask[:-256], steps=steps, lr=rate,
                     batch=batch, seed=seed + 1, method=method)
        adapted_loss = float(jax.jit(lambda d, i, m: _lm_loss(f(params, d, i, m), i, m))(
            delta, eval_ids, eval_mask))
        trainable = tree_lib.num_params(delta)
        log(f"{name}: {trainable:,} trainable parameters, {steps} steps (lr {rate:g}) on "
            f"{len(pos) - 256} positive sentences; held-out positive sentences, loss per byte: "
            f"base {base_loss:.3f} -> adapted {adapted_loss:.3f}")
        # 3. continuations with the KV cache, before and after (the same key)
        adapted = jax.jit(jpeft.wrap(gen_apply, method, sites))(params, delta, left, lmask)
        after = [decode(np.asarray(r)[-new_tokens:]) for r in adapted]
        for p, b, a in zip(PROMPTS, before, after):
            log(f"  {p!r:16} base: {b!r}\n  {'':16} {name}: {a!r}")
        results[name] = Result(base_loss, adapted_loss, before, after, trainable,
                               time.perf_counter() - t1)
    log(f"total time {time.perf_counter() - t0:.1f} s")
    return results
