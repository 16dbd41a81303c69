"""QLoRA at scale on one accelerator: a LLaMA-style NNX decoder of about a billion parameters
stored in bfloat16 or NF4 (``jpeft.quantize_params``), all-linear LoRA trained on top.

One base per process (``--base bf16`` or ``--base nf4``: device memory is per process), the
same model, batch and step otherwise. Reported per run: stored base bytes, the compiled step's
XLA memory analysis (arguments, temporaries) and FLOPs, the device's peak bytes in use over
the run, the median step time of ``--steps`` steps after 3 warm-up steps, the trainable count and
the first and last loss. Compare runs made one after another on an idle device (alternate them).
``--policy dots`` rematerialises everything but the matrix products' outputs in the backward pass
(``jax.checkpoint_policies.dots_saveable``): the dequantized weights are then recomputed from the
codes instead of kept from the forward pass.

Usage::

    python benchmarks/qlora_scale.py --base nf4 [--layers 12 --hidden 2048 --inter 5504
        --batch 8 --seq 512 --steps 10 --rank 16] [--quick]

Results are appended to ``benchmarks/results/qlora_scale.jsonl`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import common  # noqa: F401  (benchmarks/common.py: the repository on the path)
from common import append_jsonl, cost, loadavg, machine, memory

import jpeft
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM

OUT = pathlib.Path(__file__).resolve().parent / "results" / "qlora_scale.jsonl"


def build(a):
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         num_key_value_heads=a.heads // 2, max_position_embeddings=a.seq)
    apply, params = jpeft.nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ids = jax.random.randint(jax.random.key(1), (a.batch, a.seq), 1, a.vocab)
    sites = jpeft.probe(apply, params, ids)
    if a.base == "nf4":
        params = jpeft.quantize_params(params, sites, scheme="nf4")
        apply = jpeft.dequantizing(apply, remat=None)      # the policy is the flag's, below
    if a.policy == "dots":        # keep matrix products' outputs, recompute the rest (weights too)
        apply = jax.checkpoint(apply, policy=jax.checkpoint_policies.dots_saveable)
    if a.base == "nf4" or a.policy != "none":
        sites = jpeft.probe(apply, params, ids)
    return apply, params, sites, ids


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", choices=("bf16", "nf4"), required=True)
    ap.add_argument("--policy", choices=("none", "dots"), default="none",
                    help="rematerialisation of the forward pass in the backward: none, or "
                         "dots (jax.checkpoint_policies.dots_saveable: only products kept)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5504)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="a tiny model on CPU (a smoke test)")
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    a = ap.parse_args(argv)
    if a.quick:
        a.layers, a.hidden, a.inter, a.heads, a.vocab = 2, 64, 96, 4, 128
        a.batch, a.seq, a.steps = 2, 16, 2
    load = loadavg()
    t0 = time.perf_counter()
    apply, params, sites, ids = build(a)
    method = jpeft.lora("all-linear", rank=a.rank, alpha=2.0 * a.rank)
    delta = method.init(jax.random.key(2), params, sites)
    f = jpeft.wrap(apply, method, sites)

    def loss(params, delta, batch, key):
        logits = f(params, delta, batch).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]).mean()
    opt = optax.adamw(1e-4)
    step = jpeft.make_train_step(loss, opt)
    state = opt.init(delta)
    compiled = step.lower(params, delta, state, ids, jax.random.key(0)).compile()
    setup_s = time.perf_counter() - t0
    losses, times = [], []
    for i in range(3 + a.steps):
        t = time.perf_counter()
        delta, state, m = step(params, delta, state, ids, jax.random.key(i))
        losses.append(float(m["loss"]))                    # blocks on the step
        times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    row = {"base": a.base, "policy": a.policy, "layers": a.layers, "hidden": a.hidden, "intermediate": a.inter,
           "vocab": a.vocab, "batch": a.batch, "seq": a.seq, "rank": a.rank,
           "load_at_start": load, **machine(),
           "base_params": jpeft.num_params(params), "base_bytes": jpeft.num_bytes(params),
           "trainable": jpeft.num_params(delta),
           **memory(compiled), **cost(compiled),
           "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
           "step_s_median": round(statistics.median(times[3:]), 4), "setup_s": round(setup_s, 1),
           "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}
    print(json.dumps(row))
    if not a.quick:
        append_jsonl(a.out, row)
    return row


if __name__ == "__main__":
    main()
