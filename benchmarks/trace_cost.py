"""What jpeft's data-flow backend costs in Python: tracing a LoRA train step and a first eager
call, against LoRA written into the model by hand.

The model: a 24-layer unrolled Flax linen transformer (attention + MLP, width 64, 4 heads;
tiny, so the figures are the Python and tracing overhead, not FLOPs). ``Proj`` is its linear layer;
with ``rank > 0`` it also holds LoRA factors and adds ``s (x A) B`` itself: the hand-written LoRA.
jpeft adapts the same projections (q, v and the two MLP layers) of the ``rank = 0`` model with
``jpeft.lora`` through ``jpeft.wrap``.

Runners, timed in alternation in one process (both are JAX; nothing else shares the process),
``--rounds`` rounds, medians, ratios to the hand-written model:

* ``lower``: ``jax.jit(grad of the loss w.r.t. the trainable factors).lower(...)``, a fresh jit
  object each round (tracing plus lowering to StableHLO); for jpeft a fresh ``jpeft.wrap`` each
  round (``jpeft_lower``: the model is traced to a jaxpr, then evaluated with the edits) and the
  same wrapped function again (``jpeft_lower_cached``: the trace kept with it is reused);
* ``cold``: the first ``lower`` of a process, each runner in a fresh process of its own
  (``--cold`` repetitions, alternated): nothing cached yet but the probe's trace;
* ``eager``: the first call of the forward pass without ``jit`` (op by op), after every
  primitive's executable is cached by a warm-up call; for jpeft on a fresh ``jpeft.wrap``
  (``jpeft_eager``, the trace included) and again (``jpeft_eager_cached``).

Usage::

    python benchmarks/trace_cost.py [--rounds 7 --cold 3 --layers 24] [--quick]

Results go to ``benchmarks/results/trace_cost.jsonl`` (one line per run, appended).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import common  # noqa: F401  (benchmarks/common.py: the repository on the path)
from common import append_jsonl, loadavg, machine

import jpeft

D, HEADS, FF, RANK, ALPHA = 64, 4, 128, 8, 16.0
OUT = pathlib.Path(__file__).resolve().parent / "results" / "trace_cost.jsonl"
TARGETS = ("q", "v", "up", "down")


class Proj(nn.Module):
    """``x @ W + b``, plus ``(alpha / r) (x A) B`` when ``rank > 0`` (LoRA by hand)."""
    features: int
    rank: int = 0

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        y = x @ w + self.param("bias", nn.initializers.zeros, (self.features,))
        if self.rank:
            a = self.param("lora_A", nn.initializers.normal(0.02), (x.shape[-1], self.rank))
            b = self.param("lora_B", nn.initializers.normal(0.02), (self.rank, self.features))
            y = y + (ALPHA / self.rank) * ((x @ a) @ b)
        return y


class Block(nn.Module):
    rank: int = 0

    @nn.compact
    def __call__(self, x):
        r = lambda name: self.rank if name in TARGETS else 0
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (Proj(D, r(n), name=n)(h).reshape(*h.shape[:-1], HEADS, D // HEADS)
                   for n in ("q", "k", "v"))
        w = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(D // HEADS), axis=-1)
        ctx = jnp.einsum("bnts,bsnh->btnh", w, v).reshape(x.shape)
        x = x + Proj(D, r("o"), name="o")(ctx)
        h = jax.nn.gelu(Proj(FF, r("up"), name="up")(nn.LayerNorm(name="ln2")(x)))
        return x + Proj(D, r("down"), name="down")(h)


class Net(nn.Module):
    layers: int
    rank: int = 0

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = Block(self.rank, name=f"layer_{i}")(x)
        return Proj(2, name="head")(nn.LayerNorm(name="ln_f")(x).mean(axis=1))


def _lora_only(tree, keep: bool):
    """The hand-written model's parameters split into LoRA factors and the rest."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    is_lora = lambda kp: str(kp[-1].key).startswith("lora_")
    return {jax.tree_util.keystr(kp): v for kp, v in flat if is_lora(kp) == keep}


def setup(layers: int):
    x = jax.random.normal(jax.random.key(1), (2, 16, D))
    base = Net(layers)
    params = base.init(jax.random.key(0), x)
    hand = Net(layers, RANK)
    hand_params = hand.init(jax.random.key(0), x)
    sites = jpeft.probe(base.apply, params, x)
    method = jpeft.lora(TARGETS, rank=RANK, alpha=ALPHA)
    delta = method.init(jax.random.key(2), params, sites)
    return x, base, params, hand, hand_params, sites, method, delta


def runners(layers: int):
    x, base, params, hand, hand_params, sites, method, delta = setup(layers)
    lora, frozen = _lora_only(hand_params, True), _lora_only(hand_params, False)
    treedef = jax.tree_util.tree_structure(hand_params)
    order = [jax.tree_util.keystr(kp) for kp, _ in
             jax.tree_util.tree_flatten_with_path(hand_params)[0]]

    def hand_loss(lora, frozen, x):
        merged = jax.tree_util.tree_unflatten(treedef, [{**lora, **frozen}[k] for k in order])
        return jnp.sum(hand.apply(merged, x) ** 2)

    def jpeft_loss(f):
        return lambda delta, params, x: jnp.sum(f(params, delta, x) ** 2)

    cached = jpeft.wrap(base.apply, method, sites)
    lower = {
        "hand": lambda: jax.jit(jax.grad(hand_loss)).lower(lora, frozen, x),
        "jpeft": lambda: jax.jit(jax.grad(jpeft_loss(jpeft.wrap(base.apply, method, sites)))
                                 ).lower(delta, params, x),
        "jpeft_cached": lambda: jax.jit(jax.grad(jpeft_loss(cached))).lower(delta, params, x),
    }
    eager = {
        "hand": lambda: jax.block_until_ready(hand.apply(hand_params, x)),
        "jpeft": lambda: jax.block_until_ready(
            jpeft.wrap(base.apply, method, sites)(params, delta, x)),
        "jpeft_cached": lambda: jax.block_until_ready(cached(params, delta, x)),
    }
    return lower, eager


def timed(fns: dict, rounds: int) -> dict:
    for fn in fns.values():                          # warm-up: caches of primitives and ops
        fn()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def first_lower(which: str, layers: int) -> float:
    """Seconds of the first ``lower`` of runner ``which`` in this process (after the probe)."""
    lower, _ = runners(layers)
    t0 = time.perf_counter()
    lower[which]()
    return time.perf_counter() - t0


def cold(layers: int, repeats: int) -> dict:
    """Median first-lowering seconds of each runner, each in a fresh process, alternated."""
    times = {"hand": [], "jpeft": []}
    for r in range(repeats):
        for which in (("hand", "jpeft") if r % 2 == 0 else ("jpeft", "hand")):
            out = subprocess.run([sys.executable, __file__, "--first", which, "--layers",
                                  str(layers)], check=True, capture_output=True, text=True)
            times[which].append(float(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cold", type=int, default=3, help="fresh-process repetitions")
    ap.add_argument("--first", choices=("hand", "jpeft"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 rounds (a smoke test)")
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    a = ap.parse_args(argv)
    if a.first:
        print(first_lower(a.first, a.layers))
        return None
    if a.quick:
        a.layers, a.rounds, a.cold = 2, 2, 1
    load = loadavg()
    co = cold(a.layers, a.cold)
    lower, eager = runners(a.layers)
    lo = timed(lower, a.rounds)
    ea = timed(eager, a.rounds)
    row = {"layers": a.layers, "rounds": a.rounds, "load_at_start": load, **machine(),
           **{f"{k}_lower_s": round(v, 4) for k, v in lo.items()},
           **{f"{k}_eager_s": round(v, 4) for k, v in ea.items()},
           **{f"{k}_cold_lower_s": round(v, 4) for k, v in co.items()},
           "cold_lower_ratio": round(co["jpeft"] / co["hand"], 3),
           "lower_ratio": round(lo["jpeft"] / lo["hand"], 3),
           "lower_ratio_cached": round(lo["jpeft_cached"] / lo["hand"], 3),
           "eager_ratio": round(ea["jpeft"] / ea["hand"], 3),
           "eager_ratio_cached": round(ea["jpeft_cached"] / ea["hand"], 3)}
    print(json.dumps(row))
    if not a.quick:
        append_jsonl(a.out, row)
    return row


if __name__ == "__main__":
    main()
