"""The matrix products of the MiniLM train step, one by one: jitted JAX (XLA:CPU) against torch.

Every product the step of ``step_cost.py`` runs (batch 32 x 64 = N = 2,048 tokens, hidden
H = 384, intermediate I = 1,536, 6 layers): forward ``x @ W``, the input gradient ``g @ W^T``,
the weight gradient ``x^T @ g`` (only full fine-tuning forms it) and LoRA's rank-8 products;
each timed in JAX and in torch in alternating blocks (per round: one untimed call, then
``--block`` timed calls of one framework, then of the other), so the two see the same load. Not
one call each in turn: torch's OpenMP threads spin for several milliseconds after every parallel
region before they sleep (libgomp's spin count), and a JAX call right after a torch call runs on
the core they hold; per-call alternation made XLA's 384x384 product look 1.75x torch's, blocks
about 1.2x. With the number of times each configuration's step runs each product,
the script estimates how much of a step's time is matrix products in each framework: the part of
the gap to PyTorch that XLA:CPU's kernels account for.

Usage::

    python benchmarks/matmul_cost.py [--rounds 6 --block 10]

Results go to ``benchmarks/results/matmul_cost.jsonl`` (rewritten each run).
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

from common import loadavg, machine, write_jsonl  # noqa: E402

N, H, I, R, L = 2048, 384, 1536, 8, 6
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "matmul_cost.jsonl"

#: name -> (lhs shape, rhs shape, lhs transposed, rhs transposed): ``op(lhs) @ op(rhs)``.
PRODUCTS = {
    "x@W [N,H]x[H,H]": ((N, H), (H, H), False, False),
    "x@W [N,H]x[H,I]": ((N, H), (H, I), False, False),
    "x@W [N,I]x[I,H]": ((N, I), (I, H), False, False),
    "g@W^T [N,H]x[H,H]^T": ((N, H), (H, H), False, True),
    "g@W^T [N,I]x[H,I]^T": ((N, I), (H, I), False, True),
    "g@W^T [N,H]x[I,H]^T": ((N, H), (I, H), False, True),
    "x^T@g [N,H]^Tx[N,H]": ((N, H), (N, H), True, False),
    "x^T@g [N,H]^Tx[N,I]": ((N, H), (N, I), True, False),
    "x^T@g [N,I]^Tx[N,H]": ((N, I), (N, H), True, False),
    "lora x@A [N,H]x[H,r]": ((N, H), (H, R), False, False),
    "lora u@B [N,r]x[r,H]": ((N, R), (R, H), False, False),
    "lora g@B^T [N,H]x[r,H]^T": ((N, H), (R, H), False, True),
    "lora u^T@g [N,r]^Tx[N,H]": ((N, R), (N, H), True, False),
    "lora x^T@gu [N,H]^Tx[N,r]": ((N, H), (N, R), True, False),
    "lora gu@A^T [N,r]x[H,r]^T": ((N, R), (H, R), False, True),
}

#: Products per step (the 6 layers; attention's batched products and the head left out).
#: q,k,v,o are [H,H]; the FFN is [H,I] then [I,H].
COUNTS = {
    "frozen forward + input gradients": {
        "x@W [N,H]x[H,H]": 4 * L, "x@W [N,H]x[H,I]": L, "x@W [N,I]x[I,H]": L,
        "g@W^T [N,H]x[H,H]^T": 4 * L, "g@W^T [N,I]x[H,I]^T": L, "g@W^T [N,H]x[I,H]^T": L},
    "full fine-tuning adds (weight gradients)": {
        "x^T@g [N,H]^Tx[N,H]": 4 * L, "x^T@g [N,H]^Tx[N,I]": L, "x^T@g [N,I]^Tx[N,H]": L},
    "LoRA q,v adds": {"lora x@A [N,H]x[H,r]": 2 * L, "lora u@B [N,r]x[r,H]": 2 * L,
                      "lora g@B^T [N,H]x[r,H]^T": 2 * L, "lora u^T@g [N,r]^Tx[N,H]": 2 * L,
                      "lora x^T@gu [N,H]^Tx[N,r]": 2 * L, "lora gu@A^T [N,r]x[H,r]^T": 2 * L},
}


def _time_block(fn, block: int) -> list[float]:
    """One untimed call, then ``block`` timed ones: the untimed call absorbs what the other
    framework left running (torch's OpenMP threads spin for several ms after each parallel
    region before they sleep, taking a core from whatever runs next)."""
    fn()
    out = []
    for _ in range(block):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="rounds of one block per framework")
    p.add_argument("--block", type=int, default=10, help="timed calls per block")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(machine()["cpus_usable"] or 1)
    rng = np.random.default_rng(0)
    rows = []
    for name, (ls, rs, lt, rt) in PRODUCTS.items():
        a, b = (rng.standard_normal(s).astype(np.float32) for s in (ls, rs))
        f = jax.jit(lambda x, y, lt=lt, rt=rt: (x.T if lt else x) @ (y.T if rt else y))
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tf = lambda: (ta.T if lt else ta) @ (tb.T if rt else tb)
        jf = lambda: f(ja, jb).block_until_ready()
        np.testing.assert_allclose(np.asarray(f(ja, jb)), tf().numpy(), rtol=2e-3, atol=2e-2)
        jf(), tf()
        times = {"jax": [], "torch": []}
        for _ in range(args.rounds):                   # alternate blocks: same load for both
            times["jax"] += _time_block(jf, args.block)
            times["torch"] += _time_block(tf, args.block)
        m, k = (ls[1], ls[0]) if lt else ls
        n = rs[0] if rt else rs[1]
        row = {"product": name, "m": m, "k": k, "n": n, "gflop": 2 * m * k * n / 1e9,
               **{f"{w}_ms": 1e3 * statistics.median(t) for w, t in times.items()},
               **{f"{w}_ms_min": 1e3 * min(t) for w, t in times.items()}}
        row["jax_over_torch"] = row["jax_ms"] / row["torch_ms"]
        rows.append(row)
    by = {r["product"]: r for r in rows}
    totals = []
    for part, counts in COUNTS.items():
        j = sum(c * by[k]["jax_ms"] for k, c in counts.items())
        t = sum(c * by[k]["torch_ms"] for k, c in counts.items())
        totals.append({"part": part, "jax_ms": j, "torch_ms": t, "jax_minus_torch_ms": j - t})
    info = machine(loadavg_end=loadavg())
    write_jsonl(pathlib.Path(args.out), [{"kind": "product", **r, "machine": info} for r in rows]
                + [{"kind": "per_step", **t, "machine": info} for t in totals])
    print(f"{'product':<28} {'GFLOP':>6} {'jax ms':>8} {'torch ms':>9} {'jax/torch':>9}")
    for r in rows:
        print(f"{r['product']:<28} {r['gflop']:>6.3f} {r['jax_ms']:>8.2f} {r['torch_ms']:>9.2f} "
              f"{r['jax_over_torch']:>9.2f}")
    print("\nper step (medians x counts):")
    for t in totals:
        print(f"  {t['part']:<42} jax {t['jax_ms']:7.1f} ms  torch {t['torch_ms']:7.1f} ms  "
              f"difference {t['jax_minus_torch_ms']:+7.1f} ms")
    print(f"load average at the end: {info['loadavg_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
