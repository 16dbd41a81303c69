"""Train-step cost of the NNX LLaMA decoder under jpeft, and of google's qwix LoRA on the same model

Builds ``jpeft.models.llama.LlamaForCausalLM`` with random weights (about 25M parameters: hidden
512, 8 layers, 8 query / 4 key-value heads, SwiGLU intermediate 1024, vocabulary 6000, untied
``lm_head``), one synthetic batch (random token ids, all-ones mask), next-token cross-entropy
(causal LM: ``logits[:, :-1]`` against ``input_ids[:, 1:]``), ``optax.adamw(1e-4)``, float32, and
for each layer layout (unrolled ``nnx.List`` and ``scan_layers=True``) records, per configuration:

* trainable parameters;
* XLA FLOPs of the compiled train step (``cost_analysis()``) and their ratio to full fine-tuning;
* XLA temporaries of the compiled step (``memory_analysis().temp_size_in_bytes``);
* compile time, and the step time (median and minimum of the timed steps) with its ratio to full.

jpeft configurations: ``full`` (``jpeft.full_finetune()``), ``lora_qv`` (LoRA r=8, alpha=16 on
``q_proj``, ``v_proj``, factored), ``lora_qv_materialised``, ``lora_all_linear`` (every contraction
weight except ``lm_head``, factored) and ``lora_all_linear_materialised``.

qwix configurations (the peer): ``qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=...,
rank=8, alpha=16), input_ids, attention_mask, rngs=...)`` on the same NNX model (same weights),
``qwix_lora_qv`` (``q_proj|v_proj``) and ``qwix_lora_all_linear`` (the seven ``*_proj`` of every
layer); only the ``nnx.LoRAParam`` state is trained, with ``nnx.split(model, nnx.LoRAParam, ...)``
and the same loss, optimizer and donation as jpeft's step. The script asserts that qwix trains
exactly as many entries as the matching jpeft configuration, and checks once per layout that
jpeft's factored LoRA forward with a non-zero delta equals qwix's forward with the same A/B
values copied in (to 1e-4; both store ``A [in, r]`` and ``B [r, out]``, with a leading ``[L]`` axis
in the scanned layout, so the factors map one to one).

qwix 0.1.8 cannot add LoRA to the scanned layout by itself: ``apply_lora_to_model`` sets an
``nnx.Rngs`` (scalar key and counter) on every module, including the ``nnx.vmap``-stacked layer,
and its initialising call then fails inside ``nnx.scan`` (``IndexError`` in
``jax.lax.scan``'s length inference). For the scanned rows the script therefore calls
``apply_lora_to_model(..., skip_nnx_init=True)`` and creates the stacked ``[L, in, r]`` /
``[L, r, out]`` ``nnx.LoRAParam`` s (``kernel_lora_a``/``kernel_lora_b``, qwix's names and
initialisers) itself; qwix's interception then finds them inside the scan and computes the LoRA
path with its own code (``qwix_scanned_workaround`` in the rows).

All configurations of one layout are compiled first, then timed in alternation (one step of each
per round after the warm-up), so that load from other processes hits all of them alike.

Usage::

    python benchmarks/decoder_cost.py                      # both layouts, 10 timed steps
    python benchmarks/decoder_cost.py --steps 20 --layouts unrolled
    python benchmarks/decoder_cost.py --quick --out /tmp/x.jsonl   # tiny config, 3 steps (< 1 min)

Rows are appended to ``benchmarks/results/decoder_cost.jsonl`` (the file is rewritten atomically
with the old rows plus the new ones; every row carries the run's ``run_id``). ``--quick`` writes
nothing unless ``--out`` is given. See ``benchmarks/README.md`` ("Decoder (NNX) and qwix").
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import pathlib
import re
import statistics
import sys
import time
import warnings
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parent.parent
for _p in (str(REPO), str(pathlib.Path(__file__).resolve().parent)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jpeft  # noqa: E402
import common  # noqa: E402  (benchmarks/common.py)
from common import cost as _cost, loadavg as _loadavg, machine as _machine_info  # noqa: E402
from common import memory as _memory, write_jsonl  # noqa: E402  (benchmarks/common.py)
from jpeft.core import paths as paths_lib  # noqa: E402
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM, convert_layers  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "decoder_cost.jsonl"
# The decoder and its training settings, shared with the torch runner (no JAX in that module).
from decoder_torch import ALPHA, LR, MODEL, RANK, WEIGHT_DECAY  # noqa: E402,F401
QUICK_MODEL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   tie_word_embeddings=False)

# qwix matches ``re.fullmatch(module_path, "/".join(module path))``; NNX module paths are
# ``model/layers/<i>/self_attn/q_proj`` (unrolled) or ``model/layers/self_attn/q_proj`` (scanned).
QWIX_PATHS = {
    "qv": r"model/layers/(\d+/)?self_attn/(q_proj|v_proj)",
    "all_linear": r"model/layers/(\d+/)?(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)",
}
QUICK_ONLY = ("full", "lora_qv", "qwix_lora_qv")   # --quick without --only (XLA:CPU compiles
                                                   # take ~4 s each even for the tiny model)
TARGET_QWIX_RATIO = 1.0      # issue: jpeft factored LoRA step time <= 1.0x qwix's (informational)
EQUIV_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# Configurations


def _configs() -> dict[str, dict[str, Any]]:
    qv = lambda: jpeft.lora(("q_proj", "v_proj"), rank=RANK, alpha=ALPHA)
    al = lambda: jpeft.lora("all-linear", rank=RANK, alpha=ALPHA, exclude=("lm_head",))
    return {
        "full": dict(kind="jpeft", method=jpeft.full_finetune, mode="factored",
                     description="full fine-tuning of every parameter (jpeft.full_finetune(): the "
                                 "delta is a trained copy of every param)"),
        "lora_qv": dict(kind="jpeft", method=qv, mode="factored", targets="qv",
                        description=f"LoRA r={RANK} alpha={ALPHA} on q_proj, v_proj, factored: "
                                    "x @ W0 + s * (x @ A) @ B"),
        "lora_qv_materialised": dict(
            kind="jpeft", method=qv, mode="materialised", targets="qv",
            description="as lora_qv, wrap(mode='materialised'): apply(W0 + s * A @ B), the full "
                        "[in, out] weight gradient formed"),
        "lora_all_linear": dict(
            kind="jpeft", method=al, mode="factored", targets="all_linear",
            description=f"LoRA r={RANK} alpha={ALPHA} on every contraction weight except lm_head "
                        "(q,k,v,o,gate,up,down of every layer), factored"),
        "lora_all_linear_materialised": dict(
            kind="jpeft", method=al, mode="materialised", targets="all_linear",
            description="as lora_all_linear, wrap(mode='materialised')"),
        "qwix_lora_qv": dict(
            kind="qwix", targets="qv", peer="lora_qv",
            description=f"qwix.apply_lora_to_model + LoraProvider(module_path="
                        f"{QWIX_PATHS['qv']!r}, rank={RANK}, alpha={ALPHA}); nnx.LoRAParam "
                        "trained"),
        "qwix_lora_all_linear": dict(
            kind="qwix", targets="all_linear", peer="lora_all_linear",
            description=f"qwix.apply_lora_to_model + LoraProvider(module_path="
                        f"{QWIX_PATHS['all_linear']!r}, rank={RANK}, alpha={ALPHA})"),
    }


# --------------------------------------------------------------------------------------------
# Helpers (as in step_cost.py)


_HLO_OP = re.compile(r"=\s*[^=]*?\s([a-z][a-z0-9\-]*)\(")


def _hlo_summary(compiled) -> dict[str, Any]:
    """Counts of a few op kinds in the optimized HLO (whole module, fusion bodies included)."""
    try:
        text = compiled.as_text()
    except Exception:   # noqa: BLE001
        return {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        m = _HLO_OP.search(line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    keep = ("dot", "convolution", "fusion", "copy", "transpose", "while", "custom-call",
            "all-reduce", "dynamic-slice", "dynamic-update-slice")
    return {"hlo_ops": {k: counts.get(k, 0) for k in keep}, "hlo_lines": text.count("\n")}


def _machine() -> dict[str, Any]:
    try:
        import qwix
        qwix_version = qwix.__version__
    except Exception as e:   # noqa: BLE001
        qwix_version = f"unavailable: {type(e).__name__}: {e}"
    return _machine_info(qwix_version=qwix_version)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array
                   ) -> jax.Array:
    """Mean next-token cross-entropy: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``, over the
    positions whose target is a real token (``attention_mask[:, 1:]``)."""
    logits = logits[:, :-1].astype(jnp.float32)
    labels = input_ids[:, 1:]
    w = attention_mask[:, 1:].astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


def _optimizer() -> optax.GradientTransformation:
    return optax.adamw(LR, weight_decay=WEIGHT_DECAY)


# --------------------------------------------------------------------------------------------
# jpeft


@dataclasses.dataclass
class Prepared:
    row: dict[str, Any]
    run: Callable[[], float]
    compiled: Any = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def _jpeft_prepare(name: str, spec: dict, apply, params, sites, batch) -> Prepared:
    method = spec["method"]()
    f = jpeft.wrap(apply, method, sites, mode=spec["mode"])

    def loss_fn(params, delta, batch, key):
        del key     # deterministic forward (no dropout)
        logits = f(params, delta, batch["input_ids"], batch["attention_mask"])
        return causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"])

    opt = _optimizer()
    delta = method.init(jax.random.key(1), params, sites)
    opt_state = jpeft.init_opt_state(opt, delta)
    step = jpeft.make_train_step(loss_fn, opt, donate=True)
    key = jax.random.key(2)
    t0 = time.perf_counter()
    compiled = step.lower(params, delta, opt_state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    row = {"framework": "jpeft", "mode": spec["mode"], "method_config": method.config,
           "trainable_params": jpeft.num_params(delta), "compile_s": compile_s,
           **_cost(compiled), **_memory(compiled), **_hlo_summary(compiled)}
    # A copy of the initial delta (the step donates its buffers), to start qwix from the same A, B.
    init_delta = (jax.tree_util.tree_map(jnp.array, delta)
                  if spec["method"] is not jpeft.full_finetune else None)
    state = {"delta": delta, "opt_state": opt_state}
    del delta, opt_state

    def run() -> float:
        state["delta"], state["opt_state"], metrics = compiled(
            params, state["delta"], state["opt_state"], batch, key)
        jax.block_until_ready((state["delta"], state["opt_state"], metrics))
        return float(metrics["loss"])

    return Prepared(row, run, compiled, {"method": method, "state": state,
                                         "init_delta": init_delta})


# --------------------------------------------------------------------------------------------
# qwix


def _qwix_lora_model(model: LlamaForCausalLM, targets: str, batch) -> tuple[Any, dict[str, Any]]:
    """qwix's LoRA model on ``model`` (cloned by qwix; same weights). Scanned layout: see the
    module docstring (qwix cannot initialise LoRA inside ``nnx.scan``; the stacked LoRAParams are
    created here with qwix's names, shapes and initialisers)."""
    import qwix

    regex = QWIX_PATHS[targets]
    provider = qwix.LoraProvider(module_path=regex, rank=RANK, alpha=ALPHA)
    args = (batch["input_ids"], batch["attention_mask"])
    info: dict[str, Any] = {"qwix_module_path": regex}
    if not model.config.scan_layers:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = qwix.apply_lora_to_model(model, provider, *args, rngs=nnx.Rngs(1))
        info["qwix_scanned_workaround"] = False
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = qwix.apply_lora_to_model(model, provider, *args, rngs=nnx.Rngs(1),
                                          skip_nnx_init=True)
        rule = qwix.LoraRule(module_path=regex, rank=RANK, alpha=ALPHA)
        key = jax.random.key(1)
        n = 0
        for path, module in nnx.iter_modules(qm):
            p = "/".join(map(str, path))
            if not (isinstance(module, nnx.Linear) and re.fullmatch(regex, p)):
                continue
            k = module.kernel[...]                          # [L, in, out]
            layers, d_in, d_out = k.shape
            keys = jax.random.split(jax.random.fold_in(key, n), layers)
            a = jnp.stack([rule.lora_a_initializer(kk, (d_in, RANK), k.dtype) for kk in keys])
            module.kernel_lora_a = nnx.LoRAParam(a)
            module.kernel_lora_b = nnx.LoRAParam(
                jnp.stack([rule.lora_b_initializer(kk, (RANK, d_out), k.dtype) for kk in keys]))
            n += 1
        if n == 0:
            raise RuntimeError(f"qwix workaround: no nnx.Linear matched {regex!r}")
        info["qwix_scanned_workaround"] = True
        info["qwix_scanned_workaround_modules"] = n
    qm(*args)   # one call: every rule must have matched
    unused = provider.get_unused_rules()
    if unused:
        raise RuntimeError(f"qwix: rule(s) matched no operation: {unused}")
    return qm, info


def _qwix_prepare(name: str, spec: dict, qm, info: dict[str, Any], batch,
                  init_delta=None) -> Prepared:
    if init_delta is not None:
        # Same starting factors as the jpeft peer (jpeft's kaiming-uniform A, zero B; qwix's own
        # he_uniform A is sqrt(6) times wider): the same cost, and the two loss curves comparable.
        qm = nnx.clone(qm)
        info = {**info, "qwix_init": "A, B copied from the jpeft peer's initial delta",
                "qwix_factor_pairs": _copy_factors(init_delta, qm)}
    graphdef, lora, rest = nnx.split(qm, nnx.LoRAParam, ...)
    opt = _optimizer()
    opt_state = opt.init(lora)

    def loss_fn(lora, rest, batch):
        # Fresh Variable objects at this trace level (a no-op in the compiled program): merging the
        # State objects given to jax.grad as they are makes nnx.scan (scanned layout) raise
        # "Cannot extract graph node from different trace level" for the undifferentiated
        # ``rest`` (the same copy jpeft.nnx.split's apply makes).
        lora, rest = jax.tree_util.tree_map(lambda x: x, (lora, rest))
        m = nnx.merge(graphdef, lora, rest)
        logits = m(batch["input_ids"], batch["attention_mask"])
        return causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"])

    def step(lora, opt_state, rest, batch):
        loss, grads = jax.value_and_grad(loss_fn)(lora, rest, batch)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, {"loss": loss}

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(lora, opt_state, rest, batch).compile()
    compile_s = time.perf_counter() - t0
    trainable = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(lora)))
    row = {"framework": "qwix", "mode": "qwix LoRA (factored)", **info,
           "trainable_params": trainable, "compile_s": compile_s,
           **_cost(compiled), **_memory(compiled), **_hlo_summary(compiled)}
    state = {"lora": lora, "opt_state": opt_state}
    del lora, opt_state

    def run() -> float:
        state["lora"], state["opt_state"], metrics = compiled(
            state["lora"], state["opt_state"], rest, batch)
        jax.block_until_ready((state["lora"], state["opt_state"], metrics))
        return float(metrics["loss"])

    return Prepared(row, run, compiled, {"qmodel": qm})


def _copy_factors(delta, qm) -> int:
    """Copy jpeft's LoRA factors into qwix's ``nnx.LoRAParam`` s, in place: jpeft's
    ``.../<proj>/kernel/{lora_A, lora_B}`` -> qwix's ``.../<proj>/kernel_lora_{a, b}``. Both store
    ``A [in, r]`` and ``B [r, out]`` (``[L, ...]`` stacked in the scanned layout); any other layout,
    a qwix module without jpeft factors or a jpeft pair without a qwix module raises. Returns the
    number of pairs copied."""
    flat = paths_lib.flatten(delta)
    copied = 0
    for path, module in nnx.iter_modules(qm):
        if not hasattr(module, "kernel_lora_a"):
            continue
        key = tuple(str(x) for x in path) + ("kernel",)
        match = [p for p in flat if tuple(str(x) for x in p[:-1]) == key]
        a = [flat[p] for p in match if p[-1] == "lora_A"]
        b = [flat[p] for p in match if p[-1] == "lora_B"]
        if len(a) != 1 or len(b) != 1:
            raise RuntimeError(f"no jpeft factors for qwix module {'/'.join(key)}")
        if a[0].shape != module.kernel_lora_a.shape or b[0].shape != module.kernel_lora_b.shape:
            raise RuntimeError(f"factor layouts differ at {'/'.join(key)}: jpeft "
                               f"{a[0].shape}, {b[0].shape}; qwix {module.kernel_lora_a.shape}, "
                               f"{module.kernel_lora_b.shape}")
        module.kernel_lora_a.set_value(jnp.array(a[0]))
        module.kernel_lora_b.set_value(jnp.array(b[0]))
        copied += 1
    if copied != len(flat) // 2:
        raise RuntimeError(f"copied {copied} factor pairs into qwix, jpeft has {len(flat) // 2}")
    return copied


def _equivalence(qwix_model, apply, params, sites, batch, targets: str) -> dict[str, Any]:
    """jpeft's factored LoRA forward with a non-zero delta vs qwix's forward (on a clone of
    ``qwix_model``) with the same A/B values copied in."""
    method = jpeft.lora(("q_proj", "v_proj") if targets == "qv" else "all-linear", rank=RANK,
                        alpha=ALPHA, **({"exclude": ("lm_head",)} if targets != "qv" else {}))
    delta = method.init(jax.random.key(3), params, sites)
    leaves, tdef = jax.tree_util.tree_flatten(delta)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    # Perturb every factor (B is zero at init): A + N(0, 0.05), B ~ N(0, 0.05).
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    zero = jax.tree_util.tree_map(jnp.zeros_like, delta)
    delta = jax.tree_util.tree_unflatten(tdef, leaves)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    f = jax.jit(jpeft.wrap(apply, method, sites, mode="factored"))
    ours = f(params, delta, ids, mask)
    base = f(params, zero, ids, mask)    # the base model's logits (same compiled program)

    qm = nnx.clone(qwix_model)
    copied = _copy_factors(delta, qm)
    graphdef, st = nnx.split(qm)
    theirs = jax.jit(lambda s: nnx.merge(graphdef, s)(ids, mask))(st)
    diff = float(jnp.max(jnp.abs(ours - theirs)))
    return {"targets": targets, "factor_pairs": copied,
            "max_abs_diff": diff, "tol": EQUIV_TOL, "passed": diff <= EQUIV_TOL,
            "max_abs_logit": float(jnp.max(jnp.abs(ours))),
            "max_abs_delta_effect": float(jnp.max(jnp.abs(ours - base)))}


# --------------------------------------------------------------------------------------------
# Timing


def _timed(steps: int, warmup: int, runners: dict[str, Callable[[], float]]
           ) -> tuple[dict[str, dict], dict[str, list[float]]]:
    """Warm every runner up, then time them in alternation: one step of each per round, in the
    given order on even rounds and reversed on odd ones (so that neighbours, e.g. a jpeft step and
    its qwix peer, take turns going first). Returns per-runner fields and the raw times (s)."""
    losses: dict[str, list[float]] = {n: [] for n in runners}
    times: dict[str, list[float]] = {n: [] for n in runners}
    order = list(runners)
    for n in order:
        for _ in range(warmup):
            losses[n].append(runners[n]())
    for i in range(steps):
        for n in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            losses[n].append(runners[n]())
            times[n].append(time.perf_counter() - t0)
    load = _loadavg()
    out = {n: {"steps": steps, "warmup": warmup, "loadavg_after": load, "timing_order": order,
               "step_ms": 1e3 * statistics.median(times[n]), "step_ms_min": 1e3 * min(times[n]),
               "step_ms_all": [round(1e3 * t, 2) for t in times[n]],
               "loss_first": losses[n][0], "loss_last": losses[n][-1]} for n in runners}
    return out, times


# --------------------------------------------------------------------------------------------
# Main


def _build_model(model_kwargs: dict, seed: int, layout: str,
                 unrolled: LlamaForCausalLM | None = None) -> LlamaForCausalLM:
    """The decoder with random weights (``normal(0.02)`` linear maps and embeddings, unit norms),
    created in one jitted call; the scanned layout gets the same weights as ``unrolled``
    (``convert_layers``) when that is given."""
    if layout == "scanned" and unrolled is not None:
        return convert_layers(unrolled, scan_layers=True)
    cfg = LlamaConfig(**model_kwargs, scan_layers=(layout == "scanned"))
    return nnx.jit(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(seed)))()


def _run_layout(layout: str, model: LlamaForCausalLM, names: list[str], configs: dict, batch,
                args, hlo_dir: pathlib.Path | None) -> tuple[list[dict], list[dict]]:
    apply, params = jpeft.nnx.split(model)
    base_params = jpeft.num_params(params)
    sites = jpeft.probe(apply, params, batch["input_ids"], batch["attention_mask"])
    print(f"[{layout}] model: {base_params:,} parameters", flush=True)

    checks: list[dict] = []
    qwix_models: dict[str, tuple[Any, dict]] = {}
    for targets in ("qv", "all_linear"):
        if f"qwix_lora_{targets}" not in names:
            continue
        qwix_models[targets] = _qwix_lora_model(model, targets, batch)
        eq = _equivalence(qwix_models[targets][0], apply, params, sites, batch, targets)
        eq["layout"] = layout
        print(f"[{layout}] equivalence jpeft factored vs qwix LoRA ({targets}): max |diff| "
              f"{eq['max_abs_diff']:.2e} (tol {EQUIV_TOL:g}, max |logit| "
              f"{eq['max_abs_logit']:.3f}, max |delta effect| {eq['max_abs_delta_effect']:.3f})"
              f" -> {'ok' if eq['passed'] else 'FAIL'}", flush=True)
        checks.append({"check": f"{layout}: jpeft factored LoRA ({targets}) forward == qwix's "
                                f"with the same A/B (max |diff| <= {EQUIV_TOL:g})",
                       "value": eq["max_abs_diff"], "passed": eq["passed"], **eq})

    prepared: dict[str, Prepared] = {}
    for name in names:
        spec = configs[name]
        print(f"[{layout}] {name}: compile", flush=True)
        if spec["kind"] == "jpeft":
            prepared[name] = _jpeft_prepare(name, spec, apply, params, sites, batch)
        else:
            peer = prepared.get(spec["peer"])
            init = peer.extra["init_delta"] if peer is not None else None
            prepared[name] = _qwix_prepare(name, spec, *qwix_models[spec["targets"]], batch, init)
        r = prepared[name].row
        print(f"[{layout}] {name}: {r['trainable_params']:,} trainable, "
              f"{_fmt(r['flops'] and r['flops'] / 1e9, '.2f')} GFLOP, "
              f"compile {r['compile_s']:.1f}s",
              flush=True)
        if hlo_dir is not None and prepared[name].compiled is not None:
            hlo_dir.mkdir(parents=True, exist_ok=True)
            (hlo_dir / f"{layout}_{name}.hlo.txt").write_text(prepared[name].compiled.as_text())

    print(f"[{layout}] {len(prepared)} steps: {args.warmup} warm-up + {args.steps} timed each, "
          "alternating", flush=True)
    # Timing order: each qwix step right after its jpeft peer (paired ratios per round).
    order = [n for n in prepared if configs[n]["kind"] == "jpeft"]
    for n in prepared:
        peer = configs[n].get("peer")
        if configs[n]["kind"] == "qwix":
            order.insert(order.index(peer) + 1 if peer in order else len(order), n)
    timing, raw = _timed(args.steps, args.warmup, {n: prepared[n].run for n in order})

    rows = []
    for name, p in prepared.items():
        spec = configs[name]
        rows.append({"kind": "train", "layout": layout, "config": name,
                     "description": spec["description"], "base_params": base_params,
                     "trainable_percent": 100.0 * p.row["trainable_params"] / base_params,
                     **p.row, **timing[name]})
    if layout == "scanned":
        for r in rows:
            r["flops_counts_layer_loop_once"] = True
            r["flops_note"] = ("XLA's cost_analysis counts the body of the while loop over layers "
                               "once, not num_hidden_layers times: these FLOPs are the step's "
                               "with 1 of the L layers; the unrolled rows hold the per-step totals "
                               "(same arithmetic)")
    by = {r["config"]: r for r in rows}
    full = by.get("full")
    for r in rows:
        r["flops_ratio_to_full"] = (r["flops"] / full["flops"]
                                    if full and r.get("flops") and full.get("flops") else None)
        r["step_ratio_to_full"] = r["step_ms"] / full["step_ms"] if full else None
        r["step_min_ratio_to_full"] = r["step_ms_min"] / full["step_ms_min"] if full else None
    for r in rows:
        peer = configs[r["config"]].get("peer")
        if peer is None or peer not in by:
            continue
        j = by[peer]
        ok = r["trainable_params"] == j["trainable_params"]
        checks.append({"check": f"{layout}: {r['config']} trainable params == {peer}'s",
                       "value": r["trainable_params"], "jpeft": j["trainable_params"],
                       "passed": ok, "layout": layout})
        assert ok, (f"{layout}: qwix trains {r['trainable_params']:,} entries, jpeft "
                     f"{j['trainable_params']:,} for {peer}")
        ratio = j["step_ms"] / r["step_ms"]
        j["jpeft_over_qwix"] = ratio
        j["jpeft_over_qwix_min"] = j["step_ms_min"] / r["step_ms_min"]
        j["flops_jpeft_over_qwix"] = (j["flops"] / r["flops"]
                                      if j.get("flops") and r.get("flops") else None)
        r["jpeft_over_qwix"] = ratio
        paired = statistics.median(a / b for a, b in zip(raw[peer], raw[r["config"]]))
        j["jpeft_over_qwix_paired"] = r["jpeft_over_qwix_paired"] = paired
        j["loss_last_minus_qwix"] = j["loss_last"] - r["loss_last"]
        checks.append({"check": f"{layout}: {peer} step time <= {TARGET_QWIX_RATIO:.1f}x "
                                f"{r['config']}'s (medians, interleaved)",
                       "value": ratio, "value_min": j["jpeft_over_qwix_min"],
                       "value_paired": paired,
                       "flops_ratio": j["flops_jpeft_over_qwix"],
                       "passed": ratio <= TARGET_QWIX_RATIO, "layout": layout})
        same = all(j.get(k) == r.get(k) for k in ("flops", "bytes_accessed", "temp_bytes"))
        j["same_xla_cost_as_qwix"] = r["same_xla_cost_as_qwix"] = same
        checks.append({"check": f"{layout}: {peer} and {r['config']} compile to the same XLA cost "
                                "(FLOPs, bytes accessed, temporaries)",
                       "value": None, "passed": same, "layout": layout})
        dl = abs(j["loss_last"] - r["loss_last"])
        checks.append({"check": f"{layout}: {peer} and {r['config']} give the same loss after "
                                f"{args.warmup + args.steps} steps from the same A, B "
                                f"(|diff| <= {EQUIV_TOL:g})",
                       "value": dl, "passed": dl <= EQUIV_TOL, "layout": layout})
    del prepared
    gc.collect()
    return rows, checks


def _print_table(rows: list[dict]) -> None:
    head = (f"{'layout':<9} {'config':<29} {'trainable':>11} {'GFLOP':>8} {'x full':>7} "
            f"{'temp MiB':>9} {'compile s':>9} {'ms med':>8} {'ms min':>8} {'x full':>7} "
            f"{'vs qwix':>7} {'paired':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        gf = None if r.get("flops") is None else r["flops"] / 1e9
        star = "*" if r.get("flops_counts_layer_loop_once") else " "
        print(f"{r['layout']:<9} {r['config']:<29} {r['trainable_params']:>11,} "
              f"{_fmt(gf, '7.2f'):>7}{star} {_fmt(r.get('flops_ratio_to_full'), '6.3f'):>6}{star} "
              f"{_mib(r.get('temp_bytes')):>9} {r['compile_s']:>9.1f} {r['step_ms']:>8.1f} "
              f"{r['step_ms_min']:>8.1f} {_fmt(r.get('step_ratio_to_full'), '7.3f'):>7} "
              f"{_fmt(r.get('jpeft_over_qwix'), '7.3f'):>7} "
              f"{_fmt(r.get('jpeft_over_qwix_paired'), '6.3f'):>6}")
    if any(r.get("flops_counts_layer_loop_once") for r in rows):
        print("* scanned: XLA's cost_analysis counts the layer loop's body once (1 of L layers); "
              "per-step FLOPs are the unrolled rows'")


def _read_rows(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                out.append(json.loads(line))
    return out


def main(argv: list[str] | None = None) -> int:
    configs = _configs()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed steps per configuration (10; "
                                                           "3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (2; 1 with "
                                                            "--quick)")
    p.add_argument("--batch", type=int, default=None, help="batch size (4; 2 with --quick)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (128; 16 with --quick)")
    p.add_argument("--layouts", default="unrolled,scanned",
                   help="comma-separated subset of: unrolled, scanned (both)")
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(configs))
    p.add_argument("--no-qwix", action="store_true", help="skip qwix (rows and checks)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model (2 layers, 64 wide), batch 2 x seq 16, 3 steps, 1 warm-up, "
                        "configurations " + ",".join(QUICK_ONLY) + " unless --only is given; "
                        "writes only with an explicit --out")
    p.add_argument("--hlo-dir", default=None,
                   help="also write each step's optimized HLO (compiled.as_text()) there")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"results file, appended to ({DEFAULT_OUT}; none "
                                               "with --quick)")
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    host_memory = common.host_memory(args)    # before the first JAX computation
    d = dict(steps=3, warmup=1, batch=2, seq=16) if args.quick else dict(steps=10, warmup=2,
                                                                          batch=4, seq=128)
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.seq < 2:
        p.error("need --steps >= 1, --warmup >= 0, --batch >= 1, --seq >= 2")
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    if not layouts or any(s not in ("unrolled", "scanned") for s in layouts):
        p.error(f"--layouts: choose from unrolled, scanned; got {args.layouts!r}")
    names = list(configs)
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in names if s not in configs]
        if bad:
            p.error(f"--only: unknown {bad}; choose from {list(configs)}")
    elif args.quick:
        names = list(QUICK_ONLY)
    qwix_skipped = "--no-qwix" if args.no_qwix else None
    if not args.no_qwix:
        try:
            import qwix  # noqa: F401
        except ImportError as e:
            qwix_skipped = f"qwix not importable ({e}); pip install 'qwix>=0.1.8'"
            print(f"qwix rows skipped: {qwix_skipped}", flush=True)
    if qwix_skipped:
        names = [n for n in names if configs[n]["kind"] != "qwix"]
    # qwix rows need their jpeft peer (trainable-count assertion, ratio).
    for n in list(names):
        peer = configs[n].get("peer")
        if peer and peer not in names:
            names.insert(names.index(n), peer)
    out = pathlib.Path(args.out) if args.out else (None if args.quick else DEFAULT_OUT)

    model_kwargs = QUICK_MODEL if args.quick else MODEL
    machine = {**_machine(), "host_memory": host_memory}
    run_id = machine["date"]
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, model_kwargs["vocab_size"], (args.batch, args.seq), dtype=np.int32)
    batch = {"input_ids": jnp.asarray(ids),
             "attention_mask": jnp.ones((args.batch, args.seq), jnp.int32)}
    setup = {"model": "jpeft.models.llama.LlamaForCausalLM, random weights (nnx.Rngs(seed))",
             "config": model_kwargs, "quick": args.quick, "batch": args.batch, "seq": args.seq,
             "tokens": args.batch * args.seq, "loss": "next-token cross-entropy (causal LM)",
             "optimizer": f"adamw(lr={LR}, weight_decay={WEIGHT_DECAY})", "dtype": "float32",
             "lora": {"rank": RANK, "alpha": ALPHA, "scale": ALPHA / RANK}, "seed": args.seed,
             "xla_most_optimizations_disabled": bool(args.quick),
             "configs": names, "layouts": layouts, "qwix_skipped": qwix_skipped}
    print(f"decoder step cost: LLaMA-style NNX decoder {model_kwargs}, batch {args.batch} x seq "
          f"{args.seq}, {args.steps} timed steps after {args.warmup} warm-up; "
          f"{machine['device_kind']} x{machine['device_count']}, {machine['cpus_usable']} cpus, "
          f"jax {machine['jax_version']}, flax {machine['flax_version']}, qwix "
          f"{machine['qwix_version']}; load {machine['loadavg_start']}", flush=True)

    hlo_dir = pathlib.Path(args.hlo_dir) if args.hlo_dir else None
    rows: list[dict] = []
    checks: list[dict] = []
    t_start = time.perf_counter()
    # --quick: XLA's backend optimisations off (compiles ~2x faster on CPU; the timings of a tiny
    # model mean nothing anyway). Restored afterwards: a test may call main() in-process.
    prev_opt = jax.config.read("jax_disable_most_optimizations")
    if args.quick:
        jax.config.update("jax_disable_most_optimizations", True)
    try:
        unrolled = None
        for layout in layouts:
            model = _build_model(model_kwargs, args.seed, layout, unrolled)
            if layout == "unrolled":
                unrolled = model
            r, c = _run_layout(layout, model, names, configs, batch, args, hlo_dir)
            rows += r
            checks += c
            del model
    finally:
        jax.config.update("jax_disable_most_optimizations", prev_opt)
    machine["loadavg_end"] = _loadavg()
    machine["wall_s"] = time.perf_counter() - t_start

    print()
    print("Training step (XLA cost/memory analysis of the compiled step; times: median and min, "
          "all configurations of a layout interleaved)")
    _print_table(rows)
    print()
    print(f"Checks (load average start {machine['loadavg_start']}, end {machine['loadavg_end']})")
    for c in checks:
        v = c.get("value")
        v = "" if v is None else (f" ({v:.4g})" if isinstance(v, float) else f" ({v:,})")
        print(f"  {'PASS' if c['passed'] else 'MISS'}  {c['check']}{v}")

    if out is not None:
        new = [{**r, "run_id": run_id, "setup": setup, "machine": machine} for r in rows]
        new.append({"kind": "checks", "run_id": run_id, "checks": checks, "setup": setup,
                    "machine": machine})
        write_jsonl(out, _read_rows(out) + new)
        print(f"\nappended {len(new)} rows to {out}")
    else:
        print("\n--quick without --out: nothing written")
    failed_equiv = [c for c in checks if "forward ==" in c["check"] and not c["passed"]]
    return 1 if failed_equiv else 0


if __name__ == "__main__":
    sys.exit(main())
