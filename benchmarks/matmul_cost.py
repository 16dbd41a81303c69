"""The matrix products of the MiniLM train step, one by one: jitted JAX (XLA:CPU) against torch.

Every product the step of ``step_cost.py`` runs (batch 32 x 64 = N = 2,048 tokens, hidden
H = 384, intermediate I = 1,536, 6 layers): forward ``x @ W``, the input gradient ``g @ W^T``,
the weight gradient ``x^T @ g`` (only full fine-tuning forms it) and LoRA's rank-8 products
(for ``[H, H]``, ``[H, I]`` and ``[I, H]`` kernels; the gradient of ``A`` both as XLA forms
``x^T gu`` by default and in the wide form jpeft computes, :data:`WIDE`);
each timed in JAX and in torch, each framework in a process of its own (the processes
alternated, ``--reps`` of each; a process times every product in blocks: one untimed call, then
``--block`` timed calls, ``--rounds`` times): two frameworks in one process slow each other
(torch's OpenMP threads spin for several milliseconds after every parallel region before they
sleep, taking a core from whatever runs next; alternated call by call in one process, XLA's
384x384 product looked 1.75x torch's). Every product's output is checked across the frameworks
(its sum and a sample of entries). With the number of times each configuration's step runs each product,
the script estimates how much of a step's time is matrix products in each framework: the part of
the gap to PyTorch that XLA:CPU's kernels account for. JAX runs each product compiled with the
two CPU compile options of the train step (``jpeft.core.xla_options``): XLA's defaults
(``jax_xla_default``: YNNPACK's fusions) and YNNPACK's fusions off (``jax_ynn_off``); ``jax`` is
the one ``jpeft.make_train_step`` uses in this process (XLA's defaults once
``jpeft.retain_host_memory()`` is in force, as it is here unless ``--release-host-memory``).

The attention core of one layer (``softmax(q k^T / sqrt(D) + bias) v`` on ``[B, T, N, D]``,
forward and the gradients of ``q, k, v``; its two batched products are not in the table above)
is timed the same way: JAX as jpeft's BERT writes it (two einsums, float32 softmax) against
torch's ``scaled_dot_product_attention`` on the strided ``[B, N, T, D]`` views Hugging Face's
BERT passes it (``attn_implementation="sdpa"``, its default; no mask for the benchmark's
unpadded batch) and against the eager form (``softmax(q @ k^T * s) @ v``).

Usage::

    python benchmarks/matmul_cost.py [--reps 3 --rounds 6 --block 10]

Results go to ``benchmarks/results/matmul_cost.jsonl`` (rewritten each run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import common  # noqa: E402  (benchmarks/common.py)
from common import loadavg, machine, write_jsonl  # noqa: E402

from jpeft.core import xla_options  # noqa: E402

N, H, I, R, L = 2048, 384, 1536, 8, 6
#: The JAX runners: the train step's two CPU compile options (module docstring).
OPTIONS = {"jax_xla_default": {}, "jax_ynn_off": {xla_options.YNN_FUSION_TYPE: ""}}
B, T, NH = 32, 64, 12            # N = B * T tokens, NH heads of D = H / NH = 32
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
    "lora x@A [N,I]x[I,r]": ((N, I), (I, R), False, False),
    "lora u@B [N,r]x[r,I]": ((N, R), (R, I), False, False),
    "lora g@B^T [N,I]x[r,I]^T": ((N, I), (R, I), False, True),
    "lora u^T@g [N,r]^Tx[N,I]": ((N, R), (N, I), True, False),
    "lora x^T@gu [N,I]^Tx[N,r]": ((N, I), (N, R), True, False),
    "lora gu@A^T [N,r]x[I,r]^T": ((N, R), (I, R), False, True),
    "lora (gu^T@x)^T [N,H]^Tx[N,r]": ((N, H), (N, R), True, False),
    "lora (gu^T@x)^T [N,I]^Tx[N,r]": ((N, I), (N, R), True, False),
}

#: The gradient of LoRA's tall factor ``A [in, r]`` as jpeft computes it
#: (``jpeft.core.contraction.matmul``): the wide product ``gu^T x [r, in]`` behind an optimization
#: barrier, then transposed. Without the barrier XLA folds the transpose into the product and
#: computes ``x^T gu [in, r]`` (the ``lora x^T@gu`` rows). torch's autograd forms the wide product
#: for ``nn.Linear(in, r).weight`` itself; its runner here computes ``(gu^T x)^T`` too.
WIDE = ("lora (gu^T@x)^T [N,H]^Tx[N,r]", "lora (gu^T@x)^T [N,I]^Tx[N,r]")


def _lora_counts(per_layer: dict[str, int]) -> dict[str, int]:
    """LoRA's six products per adapted kernel, for ``per_layer`` kernels of each input/output
    size (``"HH"``: ``[H, H]``, ``"HI"``: ``[H, I]``, ``"IH"``: ``[I, H]``), over the L layers.
    The gradient of ``A`` is the wide product, as jpeft runs it."""
    out: dict[str, int] = {}
    for kind, n in per_layer.items():
        i, o = kind                                          # input and output size
        for name in (f"lora x@A [N,{i}]x[{i},r]", f"lora u@B [N,r]x[r,{o}]",
                     f"lora g@B^T [N,{o}]x[r,{o}]^T", f"lora u^T@g [N,r]^Tx[N,{o}]",
                     f"lora (gu^T@x)^T [N,{i}]^Tx[N,r]", f"lora gu@A^T [N,r]x[{i},r]^T"):
            out[name] = out.get(name, 0) + n * L
    return out

#: Products per step (the 6 layers; attention's batched products and the head left out).
#: q,k,v,o are [H,H]; the FFN is [H,I] then [I,H].
COUNTS = {
    "frozen forward + input gradients": {
        "x@W [N,H]x[H,H]": 4 * L, "x@W [N,H]x[H,I]": L, "x@W [N,I]x[I,H]": L,
        "g@W^T [N,H]x[H,H]^T": 4 * L, "g@W^T [N,I]x[H,I]^T": L, "g@W^T [N,H]x[I,H]^T": L},
    "full fine-tuning adds (weight gradients)": {
        "x^T@g [N,H]^Tx[N,H]": 4 * L, "x^T@g [N,H]^Tx[N,I]": L, "x^T@g [N,I]^Tx[N,H]": L},
    "LoRA q,v adds": _lora_counts({"HH": 2}),
    "LoRA all-linear adds": _lora_counts({"HH": 4, "HI": 1, "IH": 1}),
    "attention cores (every configuration)": {"attention fwd+bwd [B,T,N,D]": L},
}


def _time_block(fn, block: int) -> list[float]:
    """One untimed call, then ``block`` timed ones."""
    fn()
    out = []
    for _ in range(block):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _alternate(runners: dict, rounds: int, block: int) -> dict[str, list[float]]:
    """Blocks of ``block`` timed calls per runner, runner after runner, ``rounds`` times."""
    times = {w: [] for w in runners}
    for _ in range(rounds):
        for w, fn in runners.items():
            times[w] += _time_block(fn, block)
    return times


def _inputs(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every product's operands, drawn in :data:`PRODUCTS` order (the same in every process)."""
    return {name: tuple(rng.standard_normal(s).astype(np.float32) for s in (ls, rs))
            for name, (ls, rs, _, _) in PRODUCTS.items()}


def _fingerprint(y: np.ndarray) -> list[float]:
    """The sum and 8 fixed entries of an output: compared across the frameworks' processes."""
    flat = np.asarray(y, np.float64).ravel()
    return [float(flat.sum())] + [float(flat[i]) for i in np.linspace(0, flat.size - 1, 8,
                                                                       dtype=int)]


def _jax_product(lhs, rhs, lt: bool, rt: bool, wide: bool) -> dict:
    """``op(lhs) @ op(rhs)`` under each of :data:`OPTIONS`; ``wide``: ``lhs^T @ rhs`` as
    ``(rhs^T @ lhs)^T`` (:data:`WIDE`)."""
    fn = lambda x, y: (x.T if lt else x) @ (y.T if rt else y)
    jfn = (lambda x, y: jax.lax.optimization_barrier(y.T @ x).T) if wide else fn
    ja, jb = jnp.asarray(lhs), jnp.asarray(rhs)
    return {w: (lambda f=jax.jit(jfn, compiler_options=o): f(ja, jb).block_until_ready())
            for w, o in OPTIONS.items()}


def _torch_product(lhs, rhs, lt: bool, rt: bool, wide: bool) -> dict:
    import torch
    ta, tb = torch.from_numpy(lhs), torch.from_numpy(rhs)
    fn = lambda: (ta.T if lt else ta) @ (tb.T if rt else tb)
    return {"torch": (lambda: (tb.T @ ta).T) if wide else fn}


def _jax_attention(q, k, v, bias):
    """jpeft's BERT attention core: ``[B, T, N, D]`` in and out, softmax over keys."""
    s = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(q.shape[-1]) + bias
    return jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(s, axis=-1), v)


def _attention_inputs(rng: np.random.Generator) -> list[np.ndarray]:
    d = H // NH
    return [rng.standard_normal((B, T, NH, d)).astype(np.float32) for _ in range(4)]


def _jax_attention_runners(q, k, v, g) -> dict:
    """Forward + gradients of ``q, k, v`` for one layer's attention core (returns dq, dk, dv)."""
    bias = np.zeros((B, 1, 1, T), np.float32)      # the all-ones mask of step_cost's batch

    def fwd_bwd(q, k, v, g):
        _, vjp = jax.vjp(lambda q, k, v: _jax_attention(q, k, v, bias), q, k, v)
        return vjp(g)
    args = [jnp.asarray(x) for x in (q, k, v, g)]
    return {w: (lambda f=jax.jit(fwd_bwd, compiler_options=o): jax.block_until_ready(f(*args)))
            for w, o in OPTIONS.items()}


def _torch_attention_runners(q, k, v, g) -> dict:
    """torch's SDPA (Hugging Face BERT's default) and the eager form, on the strided
    ``[B, N, T, D]`` views Hugging Face's BERT passes; each returns dq, dk, dv as ``[B, T, N, D]``."""
    import torch
    d = H // NH
    tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).requires_grad_() for x in (q, k, v))
    tg = torch.from_numpy(g).transpose(1, 2)

    def torch_run(core):
        def run():
            core(tq, tk, tv).backward(tg)
            grads = [t.grad.transpose(1, 2) for t in (tq, tk, tv)]
            tq.grad = tk.grad = tv.grad = None
            return grads
        return run
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    eager = lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
    return {"torch": torch_run(sdpa), "torch_eager": torch_run(eager)}


def child(framework: str, rounds: int, block: int, threads: int) -> dict:
    """Every product and the attention core in one framework: medians, minima, fingerprints."""
    if framework == "torch":
        import torch
        torch.set_num_threads(threads)
        product, attention = _torch_product, _torch_attention_runners
        as_np = lambda y: [t.detach().numpy() for t in y] if isinstance(y, list) else y.numpy()
    else:
        product, attention = _jax_product, _jax_attention_runners
        as_np = lambda y: [np.asarray(t) for t in y] if isinstance(y, (list, tuple)) else (
            np.asarray(y))
    rng = np.random.default_rng(0)
    out = {}
    for name, (a, b) in _inputs(rng).items():
        _, _, lt, rt = PRODUCTS[name]
        runners = product(a, b, lt, rt, name in WIDE)
        prints = {w: _fingerprint(as_np(fn())) for w, fn in runners.items()}
        out[name] = {"times": _alternate(runners, rounds, block), "prints": prints}
    runners = attention(*_attention_inputs(rng))
    prints = {w: [_fingerprint(x) for x in as_np(fn())] for w, fn in runners.items()}
    out[ATTENTION] = {"times": _alternate(runners, rounds, block), "prints": prints}
    for r in out.values():
        r["times"] = {w: [round(1e3 * t, 4) for t in ts] for w, ts in r["times"].items()}
    return out


ATTENTION = "attention fwd+bwd [B,T,N,D]"


def _run_child(framework: str, a) -> dict:
    cmd = [sys.executable, __file__, "--child", framework, "--rounds", str(a.rounds),
           "--block", str(a.block), "--threads", str(a.threads)]
    if a.release_host_memory:
        cmd.append("--release-host-memory")
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{framework} process failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _check_same(results: dict[str, list[dict]]) -> None:
    """Every runner's fingerprints equal the first JAX runner's (float32 rounding apart)."""
    ref_fw = results["jax"][0]
    for fw, runs in results.items():
        for name, r in runs[0].items():
            want = np.asarray(ref_fw[name]["prints"]["jax_xla_default"])
            for w, got in r["prints"].items():
                np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=5e-2,
                                           err_msg=f"{name}: {w}")


def _summary(runs: dict[str, list[dict]], name: str) -> dict[str, float]:
    """Medians (of every timed call of every process) and ratios of one product."""
    times: dict[str, list[float]] = {}
    for fw_runs in runs.values():
        for r in fw_runs:
            for w, ts in r[name]["times"].items():
                times.setdefault(w, []).extend(ts)
    out = {**{f"{w}_ms": statistics.median(t) for w, t in times.items()},
           **{f"{w}_ms_min": min(t) for w, t in times.items()}}
    step = "jax_xla_default" if not xla_options.train_step_options() else "jax_ynn_off"
    out["jax_ms"], out["jax_ms_min"] = out[f"{step}_ms"], out[f"{step}_ms_min"]
    out["jax_over_torch"] = out["jax_ms"] / out["torch_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="processes per framework, alternated")
    p.add_argument("--rounds", type=int, default=6, help="rounds of one block per runner")
    p.add_argument("--block", type=int, default=10, help="timed calls per block")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch's threads (default: the usable cores)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    if args.child == "torch":               # no JAX computation in a torch process
        print("RESULT " + json.dumps(child("torch", args.rounds, args.block, args.threads)))
        return 0
    host_memory = common.host_memory(args)    # before the first JAX computation
    if args.child == "jax":
        print("RESULT " + json.dumps(child("jax", args.rounds, args.block, args.threads)))
        return 0
    runs: dict[str, list[dict]] = {"jax": [], "torch": []}
    for rep in range(args.reps):
        for fw in (("jax", "torch") if rep % 2 == 0 else ("torch", "jax")):
            runs[fw].append(_run_child(fw, args))
            print(f"  rep {rep + 1}/{args.reps}: {fw} done", flush=True)
    _check_same(runs)
    rows = []
    for name, (ls, rs, lt, rt) in PRODUCTS.items():
        m, k = (ls[1], ls[0]) if lt else ls
        n = rs[0] if rt else rs[1]
        rows.append({"kind": "product", "product": name, "m": m, "k": k, "n": n,
                     "wide": name in WIDE, "gflop": 2 * m * k * n / 1e9,
                     **_summary(runs, name)})
    rows.append({"kind": "attention", "product": ATTENTION, "shape": [B, T, NH, H // NH],
                 "gflop": 3 * 2 * 2 * B * NH * T * T * (H // NH) / 1e9,
                 **_summary(runs, ATTENTION)})
    by = {r["product"]: r for r in rows}
    totals = []
    for part, counts in COUNTS.items():
        j = sum(c * by[k]["jax_ms"] for k, c in counts.items())
        t = sum(c * by[k]["torch_ms"] for k, c in counts.items())
        totals.append({"part": part, "jax_ms": j, "torch_ms": t, "jax_minus_torch_ms": j - t})
    info = machine(loadavg_end=loadavg(), host_memory=host_memory, reps=args.reps,
                   rounds=args.rounds, block=args.block, torch_threads=args.threads,
                   timing="each framework in a process of its own, processes alternated")
    write_jsonl(pathlib.Path(args.out), [{**r, "machine": info} for r in rows]
                + [{"kind": "per_step", **t, "machine": info} for t in totals])
    print(f"{'product':<31} {'GFLOP':>6} {'XLA dflt':>8} {'YNN off':>8} {'torch ms':>9} "
          f"{'jax/torch':>9}   (jax: the train step's options in this process)")
    for r in rows:
        print(f"{r['product']:<31} {r['gflop']:>6.3f} {r['jax_xla_default_ms']:>8.2f} "
              f"{r['jax_ynn_off_ms']:>8.2f} {r['torch_ms']:>9.2f} {r['jax_over_torch']:>9.2f}")
    att = by["attention fwd+bwd [B,T,N,D]"]
    print(f"attention: torch eager {att['torch_eager_ms']:.2f} ms "
          "(torch above: SDPA, HF's default)")
    print("\nper step (medians x counts):")
    for t in totals:
        print(f"  {t['part']:<42} jax {t['jax_ms']:7.1f} ms  torch {t['torch_ms']:7.1f} ms  "
              f"difference {t['jax_minus_torch_ms']:+7.1f} ms")
    print(f"load average at the end: {info['loadavg_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
