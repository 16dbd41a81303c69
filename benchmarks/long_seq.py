"""The decoder at sequence 4096: memory and time of the LoRA train step per remat policy.

A small-width LLaMA (:mod:`jpeft.models.llama`; byte-level vocabulary, hidden 128, 4 layers
stacked by ``nnx.scan``, 4 query / 2 key-value heads) trains LoRA (q, v, rank 8) on sequences of
``--seq`` (4096) bytes of the embedded movie reviews (the sentences concatenated, cut into
windows), batch ``--batch``, AdamW, float32. For each ``LlamaConfig.remat`` (``none``, ``dots``,
``full``) the script compiles the same step and records:

* XLA's memory of the compiled step (``memory_analysis()``: temporaries, the activations kept for
  the backward pass; arguments) and FLOPs (``cost_analysis()``: a scan body counted once; the
  recomputation shows there);
* the loss over ``--steps`` real steps (the policies give the same losses: the same math) and the
  median step time (the policies timed one after the other in this process, so only their
  ratio is meaningful on a loaded machine: the row carries the load average).

Usage::

    python benchmarks/long_seq.py [--seq 4096] [--batch 2] [--steps 4]

Rows go to ``benchmarks/results/long_seq.jsonl`` (rewritten each run).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import loadavg, machine, write_jsonl  # noqa: E402  (benchmarks/common.py)

import jpeft  # noqa: E402
from jpeft.data.movies import load_movie_reviews  # noqa: E402
from jpeft.models.llama import REMAT_POLICIES, LlamaConfig, LlamaForCausalLM  # noqa: E402

MODEL = dict(vocab_size=257, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, scan_layers=True)


def windows(seq: int, count: int) -> np.ndarray:
    """``[count, seq]`` byte ids: the movie-review sentences joined by newlines, cut into
    consecutive windows of ``seq`` bytes (cycled if the text is shorter)."""
    texts, _ = load_movie_reviews()
    data = np.frombuffer("\n".join(texts).lower().encode("utf-8", "replace"), np.uint8)
    need = seq * count
    data = np.resize(data, need) if data.size < need else data[:need]
    return data.astype(np.int32).reshape(count, seq)


def lm_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()


def run_policy(remat: str, batches: np.ndarray, steps: int) -> dict:
    model = LlamaForCausalLM(LlamaConfig(**MODEL, max_position_embeddings=batches.shape[-1],
                                         remat=remat), rngs=nnx.Rngs(0))
    apply, params = jpeft.nnx.split(model)
    first = jnp.asarray(batches[0])
    sites = jpeft.probe(apply, params, first)
    method = jpeft.lora(("q_proj", "v_proj"), rank=8, alpha=16)
    f = jpeft.wrap(apply, method, sites)
    opt = optax.adamw(1e-3)
    delta = method.init(jax.random.key(1), params, sites)
    state = jpeft.init_opt_state(opt, delta)
    step = jpeft.make_train_step(lambda p, d, b, k: lm_loss(f(p, d, b), b), opt)
    key = jax.random.key(2)
    t0 = time.perf_counter()
    compiled = step.lower(params, delta, state, first, key).compile()
    compile_s = time.perf_counter() - t0
    mem, cost = compiled.memory_analysis(), compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    losses, times = [], []
    for i in range(steps):
        batch = jnp.asarray(batches[i % len(batches)])
        t0 = time.perf_counter()
        delta, state, metrics = compiled(params, delta, state, batch, key)
        losses.append(float(metrics["loss"]))
        times.append(time.perf_counter() - t0)
    return {"remat": remat, "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "flops_xla": float(cost.get("flops", 0.0)), "compile_s": compile_s,
            "losses": losses, "step_s_median": statistics.median(times[1:] or times),
            "loadavg_after": loadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=str(HERE / "results" / "long_seq.jsonl"))
    a = ap.parse_args(argv)
    batches = windows(a.seq, a.batch * a.steps).reshape(a.steps, a.batch, a.seq)
    rows = []
    for remat in REMAT_POLICIES:
        r = run_policy(remat, batches, a.steps)
        r.update(seq=a.seq, batch=a.batch, model=MODEL)
        rows.append(r)
        print(f"remat={remat:5s} temp {r['temp_bytes'] / 2**20:8.1f} MiB  args "
              f"{r['argument_bytes'] / 2**20:6.1f} MiB  XLA flops {r['flops_xla']:.3e}  step "
              f"{r['step_s_median']:.2f} s  losses {[round(x, 4) for x in r['losses']]}",
              flush=True)
    base = rows[0]
    for r in rows:
        r["temp_ratio"] = r["temp_bytes"] / base["temp_bytes"]
        r["time_ratio"] = r["step_s_median"] / base["step_s_median"]
    info = machine()
    write_jsonl(pathlib.Path(a.out), [{**r, "machine": info} for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
