"""QLoRA on the NNX LLaMA-style decoder: jpeft's quantized base against google's qwix 0.1.8 QLoRA.

The decoder of ``benchmarks/decoder_cost.py`` (``jpeft.models.llama.LlamaForCausalLM``, random
weights, hidden 512, 8 unrolled layers, 8 query / 4 key-value heads, SwiGLU 1024, vocabulary 6000,
untied ``lm_head``: 25.0M parameters), one synthetic batch of 4 x 128 token ids, next-token
cross-entropy, ``optax.adamw(1e-4, weight_decay=1e-4)``, float32 compute. Configurations:

* ``jpeft_f32_lora_qv``: LoRA r=8, alpha=16 on ``q_proj``, ``v_proj`` on the float32 base (the
  reference);
* ``jpeft_<scheme>_lora_qv`` / ``jpeft_nf4_lora_all_linear``: the base quantized the recipes' way
  (:func:`jpeft.recipes.quantization.prepare`: :func:`jpeft.quantize_params` on every linear weight
  but ``lm_head`` and the embedding, the apply function wrapped with :func:`jpeft.dequantizing`),
  LoRA with float32 factors on q, v or on all seven projections;
* ``qwix_<scheme>_lora_qv`` / ``qwix_nf4_lora_all_linear``: qwix's QLoRA on the same model (same
  weights): ``qwix.apply_lora_to_model(model, qwix.LoraProvider([LoraRule(module_path=<q,v or all
  projections>, rank=8, alpha=16, weight_qtype=Q, tile_size=T), QuantizationRule(module_path=<all
  seven projections>, weight_qtype=Q, tile_size=T)]), ids, mask, rngs=...)`` with ``Q = "nf4"``,
  ``T = 64`` (qwix's NF4: absmax per tile of 64 along the contraction axis, float32 scales, codes
  stored ``uint4``) or ``Q = int8``, ``T = None`` (per output channel, as jpeft's int8); the
  ``nnx.LoRAParam`` state trained with the same loss and optimizer. qwix starts from jpeft's
  initial factors (copied in), so both train the same LoRA on their own quantized base.

Each configuration runs in a process of its own (``--worker NAME``: build, quantize, compile,
``--warmup`` untimed and ``--steps`` timed steps, one JSON line); the parent runs the
configurations in turn, ``--reps`` times, the order reversed on every other round, and reports
medians over the processes and the per-round ratio of each jpeft configuration to its qwix peer
(adjacent processes). Deterministic figures come from XLA: ``cost_analysis()`` FLOPs and
``memory_analysis()`` bytes of the compiled train step; the base's stored bytes are counted three
ways: logical (entries x bits of their dtype), resident (``on_device_size_in_bytes`` of the
arrays as this backend holds them: XLA:CPU keeps a ``uint4`` array one byte per entry), and the
float32 base they stand for. Each qwix process also checks that qwix's forward pass equals jpeft's
LoRA, same factors, on qwix's own dequantized weights (the two compute the same LoRA; only the
quantizers differ), and every process reports the quantization error of its base (relative
Frobenius error per quantized weight, mean and max) and the loss at the start (factors B = 0: the
quantized base's own loss) against the float32 base's.

Usage::

    python benchmarks/qlora_decoder.py                    # 7 configurations x 3 rounds
    python benchmarks/qlora_decoder.py --reps 5 --only jpeft_nf4_lora_qv,qwix_nf4_lora_qv
    python benchmarks/qlora_decoder.py --quick            # tiny model, in this process, seconds

Rows are appended to ``benchmarks/results/qlora_decoder.jsonl`` (``--quick`` writes nothing unless
``--out`` is given). See ``benchmarks/README.md`` ("QLoRA").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
for _p in (str(REPO), str(pathlib.Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)
import decoder_cost as dc  # noqa: E402  (benchmarks/decoder_cost.py: model, loss, qwix helpers)
import jpeft  # noqa: E402
from jpeft.core import paths as paths_lib  # noqa: E402
from jpeft.recipes import quantization  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "qlora_decoder.jsonl"
RANK, ALPHA = dc.RANK, dc.ALPHA
NF4_TILE = 64
EQUIV_TOL = 1e-4

CONFIGS: dict[str, dict[str, Any]] = {
    "jpeft_f32_lora_qv": dict(framework="jpeft", scheme="none", targets="qv"),
    "jpeft_nf4_lora_qv": dict(framework="jpeft", scheme="nf4", targets="qv"),
    "qwix_nf4_lora_qv": dict(framework="qwix", scheme="nf4", targets="qv",
                             peer="jpeft_nf4_lora_qv"),
    "jpeft_nf4_lora_all_linear": dict(framework="jpeft", scheme="nf4", targets="all_linear"),
    "qwix_nf4_lora_all_linear": dict(framework="qwix", scheme="nf4", targets="all_linear",
                                     peer="jpeft_nf4_lora_all_linear"),
    "jpeft_int8_lora_qv": dict(framework="jpeft", scheme="int8", targets="qv"),
    "qwix_int8_lora_qv": dict(framework="qwix", scheme="int8", targets="qv",
                              peer="jpeft_int8_lora_qv"),
}
QUICK_ONLY = ("jpeft_nf4_lora_qv", "qwix_nf4_lora_qv")
REFERENCE = "jpeft_f32_lora_qv"


def _method(targets: str) -> jpeft.Method:
    if targets == "qv":
        return jpeft.lora(("q_proj", "v_proj"), rank=RANK, alpha=ALPHA)
    return jpeft.lora("all-linear", rank=RANK, alpha=ALPHA, exclude=("lm_head",))


def _qwix_rules(targets: str, scheme: str) -> list:
    """qwix's QLoRA rules: LoRA (and the quantization) on the targets, the quantization alone on
    the other projections (every linear weight but ``lm_head``, as jpeft's all-linear rule)."""
    import qwix
    qtype = {"nf4": "nf4", "int8": jnp.int8}[scheme]
    tile = NF4_TILE if scheme == "nf4" else None
    rules = [qwix.LoraRule(module_path=dc.QWIX_PATHS[targets], rank=RANK, alpha=ALPHA,
                           weight_qtype=qtype, tile_size=tile)]
    if targets != "all_linear":
        rules.append(qwix.QuantizationRule(module_path=dc.QWIX_PATHS["all_linear"],
                                           weight_qtype=qtype, tile_size=tile))
    return rules


def _bits(x) -> int:
    return jax.dtypes.itemsize_bits(x.dtype)


def _bytes(leaves) -> dict[str, int]:
    """Logical bytes (entries x bits / 8) and resident bytes (as the backend holds the arrays)."""
    leaves = list(leaves)
    return {"logical": int(sum(x.size * _bits(x) for x in leaves) // 8),
            "resident": int(sum(x.addressable_data(0).on_device_size_in_bytes() for x in leaves))}


def _rel_errors(pairs) -> dict[str, float | int]:
    errs = [float(jnp.linalg.norm(w - w_hat) / jnp.linalg.norm(w)) for w, w_hat in pairs]
    return {"quantized_weights": len(errs), "quant_rel_error_mean": float(np.mean(errs)),
            "quant_rel_error_max": float(np.max(errs))}


def _timed(run, steps: int, warmup: int) -> dict[str, Any]:
    losses = [run() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(run())
        times.append(time.perf_counter() - t0)
    return {"step_ms": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
            "step_ms_all": [round(1e3 * t, 2) for t in times], "loss_first": losses[0],
            "loss_last": losses[-1], "steps": steps, "warmup": warmup}


def _batch(model_kwargs: dict, batch: int, seq: int, seed: int) -> dict[str, jax.Array]:
    ids = np.random.default_rng(seed).integers(0, model_kwargs["vocab_size"], (batch, seq),
                                               dtype=np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((batch, seq), jnp.int32)}


def _float_loss(apply, params, batch) -> float:
    logits = jax.jit(apply)(params, batch["input_ids"], batch["attention_mask"])
    return float(dc.causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"]))


def _measure_jpeft(spec, model, batch, steps, warmup) -> dict[str, Any]:
    apply, params = jpeft.nnx.split(model)
    args = (batch["input_ids"], batch["attention_mask"])
    sites = jpeft.probe(apply, params, *args)
    f32_loss = _float_loss(apply, params, batch)
    base = quantization.prepare(apply, params, sites, args, spec["scheme"])
    quantized = quantization.quantized_paths(base.params)
    full = paths_lib.flatten(params)
    deq = paths_lib.flatten(jpeft.dequantize_params(base.params))
    errors = _rel_errors((full[p], deq[p]) for p in quantized) if quantized else {}
    method = _method(spec["targets"])
    prepared = dc._jpeft_prepare("", {"method": lambda: method, "mode": "factored"}, base.apply,
                                 base.params, base.sites, batch)
    row = {**prepared.row, **_timed(prepared.run, steps, warmup), **errors,
           "base_bytes": _bytes(jax.tree.leaves(base.params)),
           "base_bytes_f32": jpeft.num_bytes(params), "loss_f32_base": f32_loss,
           "quantization": quantization.config(spec["scheme"])}
    return row


def _qwix_dequantized(qm, model) -> tuple[list, dict]:
    """``(weight, qwix's dequantized weight)`` pairs and ``{path: dequantized}`` of every quantized
    kernel of ``qm`` (paths as jpeft.nnx.split's, ``.../kernel``)."""
    import qwix
    from qwix._src.providers import ptq
    original = dict(nnx.iter_modules(model))
    pairs, deq = [], {}
    for path, module in nnx.iter_modules(qm):
        k = getattr(module, "kernel", None)
        if not isinstance(k, ptq.WithAux):
            continue
        arr = jax.tree.map(lambda v: v[...] if isinstance(v, nnx.Variable) else v, k.array,
                           is_leaf=lambda v: isinstance(v, nnx.Variable))
        w_hat = qwix.dequantize(arr)
        w = original[path].kernel[...]
        pairs.append((w, w_hat))
        deq[tuple(str(p) for p in path) + ("kernel",)] = w_hat
    return pairs, deq


def _qwix_equivalence(qm, model, deq, batch, targets) -> dict[str, Any]:
    """qwix's forward with a perturbed LoRA (copied in) against jpeft's LoRA, same factors, on the
    float model with qwix's dequantized weights substituted."""
    apply, params = jpeft.nnx.split(model)
    args = (batch["input_ids"], batch["attention_mask"])
    key = lambda kp: tuple(str(x) for x in paths_lib.to_path(kp))
    params_q = jax.tree_util.tree_map_with_path(lambda kp, w: deq.get(key(kp), w), params)
    found = [key(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]
             if key(kp) in deq]
    if len(found) != len(deq):
        raise RuntimeError(f"qwix's {len(deq)} quantized kernels map to {len(found)} of jpeft's "
                           f"parameter paths")
    sites = jpeft.probe(apply, params_q, *args)
    method = _method(targets)
    delta = method.init(jax.random.key(3), params_q, sites)
    leaves, tdef = jax.tree_util.tree_flatten(delta)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    delta = jax.tree_util.tree_unflatten(
        tdef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    ours = jax.jit(jpeft.wrap(apply, method, sites))(params_q, delta, *args)
    clone = nnx.clone(qm)
    dc._copy_factors(delta, clone)
    graphdef, state = nnx.split(clone)
    theirs = jax.jit(lambda s: nnx.merge(graphdef, s)(*args))(state)
    diff = float(jnp.max(jnp.abs(ours - theirs)))
    return {"check": "qwix QLoRA forward == jpeft LoRA on qwix's dequantized weights, same "
                     f"factors (max |logit diff| <= {EQUIV_TOL:g})",
            "value": diff, "passed": diff <= EQUIV_TOL,
            "max_abs_logit": float(jnp.max(jnp.abs(ours)))}


def _measure_qwix(spec, model, batch, steps, warmup, check) -> dict[str, Any]:
    import qwix
    apply, params = jpeft.nnx.split(model)
    args = (batch["input_ids"], batch["attention_mask"])
    f32_loss = _float_loss(apply, params, batch)
    rules = _qwix_rules(spec["targets"], spec["scheme"])
    provider = qwix.LoraProvider(rules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qwix.apply_lora_to_model(model, provider, *args, rngs=nnx.Rngs(1))
    qm(*args)
    unused = provider.get_unused_rules()
    if unused:
        raise RuntimeError(f"qwix: rule(s) matched no operation: {unused}")
    pairs, deq = _qwix_dequantized(qm, model)
    errors = _rel_errors(pairs)
    base_state = nnx.state(qm, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    base_leaves = [v for v in jax.tree.leaves(base_state)]
    # jpeft's initial factors (same key and shapes as the peer's), copied into qwix's LoRAParams.
    sites = jpeft.probe(apply, params, *args)
    init = _method(spec["targets"]).init(jax.random.key(1), params, sites)
    info = {"qwix_rules": [repr(r) for r in rules]}
    prepared = dc._qwix_prepare("", {}, qm, info, batch, init)
    row = {**prepared.row, **_timed(prepared.run, steps, warmup), **errors,
           "base_bytes": _bytes(base_leaves), "base_bytes_f32": jpeft.num_bytes(params),
           "loss_f32_base": f32_loss,
           "base_dtypes": sorted({str(x.dtype) for x in base_leaves})}
    if check:
        row["equivalence"] = _qwix_equivalence(qm, model, deq, batch, spec["targets"])
    return row


def measure(name: str, *, model_kwargs: dict, batch: int, seq: int, steps: int, warmup: int,
            seed: int = 0, check: bool = True) -> dict[str, Any]:
    """One configuration in this process: build the decoder, quantize, compile, time."""
    spec = CONFIGS[name]
    t0 = time.perf_counter()
    model = dc._build_model(model_kwargs, seed, "unrolled")
    data = _batch(model_kwargs, batch, seq, seed)
    if spec["framework"] == "jpeft":
        row = _measure_jpeft(spec, model, data, steps, warmup)
    else:
        row = _measure_qwix(spec, model, data, steps, warmup, check)
    row.update(config=name, framework=spec["framework"], scheme=spec["scheme"],
               targets=spec["targets"], base_params=jpeft.num_params(jpeft.nnx.split(model)[1]),
               process_wall_s=time.perf_counter() - t0)
    return row


def _spawn(name: str, args) -> dict[str, Any]:
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", name,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--seq", str(args.seq), "--seed", str(args.seed)]
    if args.quick:
        cmd.append("--quick")
    if not args.check_every_rep and args._rep > 0:
        cmd.append("--no-check")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{name}: worker failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


_DETERMINISTIC = ("trainable_params", "flops", "bytes_accessed", "temp_bytes", "argument_bytes",
                  "output_bytes", "alias_bytes")


def summarise(runs: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    """Per configuration: medians over its processes and the deterministic figures (checked equal
    across processes); per jpeft/qwix pair: ratios (median of per-round ratios, ratio of medians).
    Returns ``(summary rows, checks)``."""
    rows, checks = [], []
    for name, procs in runs.items():
        first = procs[0]
        same = all(all(p.get(k) == first.get(k) for k in _DETERMINISTIC) for p in procs)
        row = {"kind": "summary", "config": name, "framework": first["framework"],
               "scheme": first["scheme"], "targets": first["targets"],
               "processes": len(procs), "deterministic_equal_across_processes": same,
               "step_ms_median": statistics.median(p["step_ms"] for p in procs),
               "step_ms_per_process": [round(p["step_ms"], 2) for p in procs],
               "compile_s_median": statistics.median(p["compile_s"] for p in procs),
               **{k: first.get(k) for k in _DETERMINISTIC},
               "base_bytes": first["base_bytes"], "base_bytes_f32": first["base_bytes_f32"],
               "base_params": first["base_params"],
               "loss_f32_base": first["loss_f32_base"], "loss_first": first["loss_first"],
               "loss_last": first["loss_last"]}
        for k in ("quantized_weights", "quant_rel_error_mean", "quant_rel_error_max"):
            if k in first:
                row[k] = first[k]
        row["base_ratio_logical"] = row["base_bytes_f32"] / row["base_bytes"]["logical"]
        row["base_ratio_resident"] = row["base_bytes_f32"] / row["base_bytes"]["resident"]
        checks.append({"check": f"{name}: XLA cost and memory equal in every process",
                       "passed": same})
        eq = [p["equivalence"] for p in procs if "equivalence" in p]
        if eq:
            checks.append({**eq[0], "check": f"{name}: {eq[0]['check']}"})
        rows.append(row)
    by = {r["config"]: r for r in rows}
    ref = by.get(REFERENCE)
    for r in rows:
        if ref is not None:
            r["step_ratio_to_f32_lora_qv"] = r["step_ms_median"] / ref["step_ms_median"]
            r["temp_ratio_to_f32_lora_qv"] = (r["temp_bytes"] / ref["temp_bytes"]
                                              if r.get("temp_bytes") and ref.get("temp_bytes")
                                              else None)
        peer = CONFIGS[r["config"]].get("peer")
        if peer is None or peer not in by:
            continue
        j = by[peer]
        ok = j["trainable_params"] == r["trainable_params"]
        checks.append({"check": f"{peer} and {r['config']} train as many entries",
                       "value": r["trainable_params"], "jpeft": j["trainable_params"],
                       "passed": ok})
        paired = [a["step_ms"] / b["step_ms"] for a, b in zip(runs[peer], runs[r["config"]])]
        ratios = {"jpeft_over_qwix_step": j["step_ms_median"] / r["step_ms_median"],
                  "jpeft_over_qwix_step_paired": statistics.median(paired),
                  "jpeft_over_qwix_step_per_round": [round(x, 3) for x in paired],
                  "jpeft_over_qwix_flops": (j["flops"] / r["flops"]
                                            if j.get("flops") and r.get("flops") else None),
                  "jpeft_over_qwix_temp_bytes": (j["temp_bytes"] / r["temp_bytes"]
                                                 if j.get("temp_bytes") and r.get("temp_bytes")
                                                 else None),
                  "jpeft_over_qwix_base_bytes_logical": (j["base_bytes"]["logical"]
                                                         / r["base_bytes"]["logical"]),
                  "jpeft_over_qwix_base_bytes_resident": (j["base_bytes"]["resident"]
                                                          / r["base_bytes"]["resident"])}
        j.update(ratios)
        r.update(ratios)
    return rows, checks


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _print(rows: list[dict], checks: list[dict]) -> None:
    head = (f"{'config':<26} {'trainable':>9} {'base MB log/res':>16} {'x f32':>11} "
            f"{'rel err':>7} {'GFLOP':>7} {'temp MiB':>8} {'ms med':>8} {'vs qwix':>7} "
            f"{'paired':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        b = r["base_bytes"]
        err = r.get("quant_rel_error_mean")
        print(f"{r['config']:<26} {r['trainable_params']:>9,} "
              f"{b['logical'] / 1e6:>7.2f}/{b['resident'] / 1e6:<8.2f} "
              f"{r['base_ratio_logical']:>5.2f}/{r['base_ratio_resident']:<5.2f} "
              f"{'-' if err is None else format(err, '.4f'):>7} "
              f"{(r.get('flops') or 0) / 1e9:>7.2f} {(r.get('temp_bytes') or 0) / 2**20:>8.1f} "
              f"{r['step_ms_median']:>8.1f} {_fmt(r.get('jpeft_over_qwix_step')):>7} "
              f"{_fmt(r.get('jpeft_over_qwix_step_paired')):>6}")
    print()
    for c in checks:
        v = c.get("value")
        v = "" if v is None else (f" ({v:.3g})" if isinstance(v, float) else f" ({v:,})")
        print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']}{v}")


def _read(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=None, help="rounds of processes (3; 1 with "
                                                          "--quick)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per process (5; 2 with "
                                                           "--quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (2; 1)")
    p.add_argument("--batch", type=int, default=None, help="batch size (4; 2)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (128; 16)")
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(CONFIGS))
    p.add_argument("--no-qwix", action="store_true", help="skip the qwix configurations")
    p.add_argument("--quick", action="store_true",
                   help="tiny model (2 layers, 64 wide), batch 2 x 16, 2 steps after 1 warm-up, "
                        "one round of " + ", ".join(QUICK_ONLY) + " unless --only says "
                        "otherwise, in this process, XLA's optimisations off; writes only with "
                        "--out (a smoke test)")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process (no timing isolation; --quick "
                        "implies it)")
    p.add_argument("--check-every-rep", action="store_true",
                   help="run the qwix forward check in every process (default: first round)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"results file, appended to ({DEFAULT_OUT})")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    host_memory = common.host_memory(args)
    d = (dict(reps=1, steps=2, warmup=1, batch=2, seq=16) if args.quick else
         dict(reps=3, steps=5, warmup=2, batch=4, seq=128))
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    model_kwargs = dc.QUICK_MODEL if args.quick else dc.MODEL

    if args.worker:                     # one configuration, this process, one JSON line
        row = measure(args.worker, model_kwargs=model_kwargs, batch=args.batch, seq=args.seq,
                      steps=args.steps, warmup=args.warmup, seed=args.seed,
                      check=not args.no_check)
        print("RESULT " + json.dumps(row, default=str), flush=True)
        return 0

    names = list(QUICK_ONLY if args.quick and not args.only else CONFIGS)
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in names if s not in CONFIGS]
        if bad:
            p.error(f"--only: unknown {bad}; choose from {list(CONFIGS)}")
    qwix_skipped = "--no-qwix" if args.no_qwix else None
    if not args.no_qwix:
        try:
            import qwix  # noqa: F401
        except ImportError as e:
            qwix_skipped = f"qwix not importable ({e}); pip install 'qwix==0.1.8'"
            print(f"qwix configurations skipped: {qwix_skipped}", flush=True)
    for n in list(names):                               # a qwix row needs its jpeft peer
        peer = CONFIGS[n].get("peer")
        if peer and peer not in names:
            names.insert(names.index(n), peer)
    if qwix_skipped:                                    # the peers stay
        names = [n for n in names if CONFIGS[n]["framework"] != "qwix"]
    out = pathlib.Path(args.out) if args.out else (None if args.quick else DEFAULT_OUT)
    machine = {**dc._machine(), "host_memory": host_memory,
               "proc_loadavg_start": pathlib.Path("/proc/loadavg").read_text().strip()}
    in_process = args.quick or args.in_process
    setup = {"model": "jpeft.models.llama.LlamaForCausalLM, random weights, unrolled layers",
             "config": model_kwargs, "batch": args.batch, "seq": args.seq,
             "loss": "next-token cross-entropy", "optimizer": f"adamw({dc.LR}, "
             f"weight_decay={dc.WEIGHT_DECAY})", "lora": {"rank": RANK, "alpha": ALPHA},
             "nf4_tile_qwix": NF4_TILE, "steps": args.steps, "warmup": args.warmup,
             "reps": args.reps, "configs": names, "in_process": in_process,
             "quick": args.quick, "qwix_skipped": qwix_skipped}
    print(f"QLoRA on the NNX decoder {model_kwargs}, batch {args.batch} x {args.seq}; "
          f"{args.reps} round(s) of {len(names)} configurations, {args.warmup} + {args.steps} "
          f"steps each, {'in this process' if in_process else 'one process each'}; load "
          f"{machine['proc_loadavg_start']}", flush=True)

    runs: dict[str, list[dict]] = {n: [] for n in names}
    prev = jax.config.read("jax_disable_most_optimizations")
    if args.quick:
        jax.config.update("jax_disable_most_optimizations", True)
    t_start = time.perf_counter()
    try:
        for rep in range(args.reps):
            args._rep = rep
            for name in (names if rep % 2 == 0 else names[::-1]):
                if in_process:
                    row = measure(name, model_kwargs=model_kwargs, batch=args.batch,
                                  seq=args.seq, steps=args.steps, warmup=args.warmup,
                                  seed=args.seed, check=rep == 0 or args.check_every_rep)
                else:
                    row = _spawn(name, args)
                row["round"] = rep
                runs[name].append(row)
                print(f"[round {rep}] {name}: {row['step_ms']:.1f} ms/step (median of "
                      f"{args.steps}), compile {row['compile_s']:.1f} s, base "
                      f"{row['base_bytes']['logical'] / 1e6:.2f} MB logical", flush=True)
    finally:
        jax.config.update("jax_disable_most_optimizations", prev)
    machine["proc_loadavg_end"] = pathlib.Path("/proc/loadavg").read_text().strip()
    machine["wall_s"] = time.perf_counter() - t_start
    rows, checks = summarise(runs)
    print()
    _print(rows, checks)
    if out is not None:
        run_id = machine["date"]
        new = [{**r, "kind": "process", "run_id": run_id} for n in names for r in runs[n]]
        new += [{**r, "run_id": run_id, "setup": setup, "machine": machine} for r in rows]
        new.append({"kind": "checks", "run_id": run_id, "checks": checks, "setup": setup,
                    "machine": machine})
        common.write_jsonl(out, _read(out) + new)
        print(f"\nappended {len(new)} rows to {out}")
    return 0 if all(c["passed"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
