"""Cost of one training step for each fine-tuning method, JAX (jpeft) and PyTorch (HF PEFT).

Runs the embedded MiniLM (all-MiniLM-L6-v2, 6 layers, 384 wide, 22.7M parameters) as a
2-label sequence classifier (mean pooling) on one synthetic batch (random token ids, full attention
mask, random labels), cross-entropy loss, ``optax.adamw(1e-4)``, and for every configuration
records, in one run:

* trainable parameters and bytes;
* XLA FLOPs of the compiled train step (``cost_analysis()``) and their ratio to full fine-tuning;
* XLA memory of the compiled step (``memory_analysis()``: temporaries, arguments, outputs);
* optimizer-state bytes and their ratio to the trainable bytes (Adam: 2x, plus a step counter);
* median (and minimum) wall time of a step (after warm-up);
* when torch + transformers + peft import, the trainable parameters and optimizer-state bytes of
  the equivalent Hugging Face set-up (where Hugging Face PEFT has the method: full, BitFit, LoRA,
  AdaLoRA; FAR, FishMask and diff pruning have no PEFT counterpart). Its step time is not taken
  here by default: two frameworks in one process slow each other (torch ran up to 2.2x slower
  in this harness than in a process of its own on one machine). ``isolated.py`` times every
  runner in a process of its own; ``--torch-in-process`` times torch here too, as a diagnostic;
* for full fine-tuning, BitFit and LoRA (q,v and all-linear), the JAX floor: the same step
  written by hand in plain JAX (``benchmarks/floor.py``, no jpeft; tokens flattened to
  ``[B*T, H]``, and the naive ``[B, T, H]`` form as a second row), and jpeft's ratio to it.

Every runner of a configuration (jpeft, jpeft without the non-finite check, the floors, and
torch with ``--torch-in-process``) is timed in alternation, one step each per round, so a burst
of load hits all alike.

Configurations are method presets (``jpeft.presets``: each row is a preset, its options and a
forward mode; the stages before a preset's main training stage, such as FAR's column selection or
FishMask's Fisher pass, run first on the benchmark batch, and one step of the main stage's method
is timed): full fine-tuning, BitFit, LoRA (q,v and all-linear, factored and materialised), FAR
(20% of the FFN columns), a 0.5% FishMask sparse mask (factored and materialised), diff pruning
(hard-concrete gates + expected-L0 penalty), AdaLoRA (rank allocator wrapped around AdamW +
orthogonality penalty), SAID and DID (d = 1000), each with the classifier head trained in full
alongside; a preset registered without a row here gets one with its default options.

It also compiles the inference forward pass three ways (base model, LoRA merged into the weights,
LoRA factored/unmerged) to show that merging costs nothing at inference.

Usage::

    python benchmarks/step_cost.py                   # everything, 10 timed steps
    python benchmarks/step_cost.py --steps 3 --no-torch --only lora_qv,inference

Results go to ``benchmarks/results/step_cost.jsonl`` (rewritten each run, one JSON object per line)
and a table is printed. See ``benchmarks/README.md`` for the meaning of every field.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import pathlib
import resource
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jpeft  # noqa: E402
from jpeft import presets  # noqa: E402
import common  # noqa: E402  (benchmarks/common.py)
from common import cost as _cost, loadavg as _loadavg, machine as _machine_info  # noqa: E402
from common import memory as _memory, write_jsonl  # noqa: E402  (benchmarks/common.py)
import floor as floor_lib  # noqa: E402  (benchmarks/floor.py)
import torch_step  # noqa: E402  (benchmarks/torch_step.py: the Hugging Face runner, no JAX)
from torch_step import (ADALORA, ALPHA, LR, NUM_LABELS, RANK, WEIGHT_DECAY,  # noqa: E402
                        adalora_schedule as _adalora_schedule, benchmark_batch)
from jpeft.core import xla_options  # noqa: E402
from jpeft.data import minilm_dir  # noqa: E402
from jpeft.methods import adalora as adalora_lib  # noqa: E402
from jpeft.methods import fishmask as fishmask_lib  # noqa: E402
from jpeft.models import load_hf_bert  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "step_cost.jsonl"

# Informational targets (a MISS is printed, never fatal).
TARGETS = {"lora_qv": 0.70, "lora_all_linear": 0.75, "bitfit": 0.70}

FAR_FRACTION = 0.2                    # kept share of the output columns of every FFN matrix
SPARSE_DENSITY = 0.005                # FishMask: kept share of every entry but the classifier's
FISHER_EXAMPLES = 16                  # the first 16 examples of the benchmark batch

_CACHE: dict[Any, Any] = {}          # stage states before the timed stage, per (preset, options)


# --------------------------------------------------------------------------------------------
# Configurations: method presets (jpeft.presets) on the benchmark batch


class FitResult(NamedTuple):
    delta: Any
    seconds: float


class BatchEnv(NamedTuple):
    """The benchmark batch as the environment of a preset's stages (:class:`jpeft.presets.Env`):
    stages before the timed one train on this one batch; examples are its first rows."""
    model: Any
    params: Any
    sites: Any
    batch: dict[str, Any]
    head: tuple[str, ...] = ("classifier",)
    log: Callable[[str], None] = lambda m: print(f"  {m}", flush=True)

    def fit(self, method, delta, *, steps, optimizer, mode, seed) -> FitResult:
        """``steps`` steps on the benchmark batch (cross-entropy, no dropout)."""
        f = jpeft.wrap(self.model.apply, method, self.sites, mode=mode)

        def loss(params, delta, batch, key):
            logits = f(params, delta, batch["input_ids"], batch["attention_mask"], delta_rng=key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        step = jpeft.make_train_step(loss, optimizer, method=method)
        state = jpeft.init_opt_state(optimizer, delta, method=method)
        key = jax.random.key(seed)
        t0 = time.perf_counter()
        for i in range(steps):
            delta, state, _ = step(self.params, delta, state, self.batch,
                                   jax.random.fold_in(key, i))
        jax.block_until_ready(delta)
        return FitResult(delta, time.perf_counter() - t0)

    def examples(self, n: int, seed: int) -> dict[str, Any]:
        """The first ``n`` rows of the batch (already random ids and labels; ``seed`` unused)."""
        del seed
        return {k: v[:min(n, v.shape[0])] for k, v in self.batch.items()}

    def log_likelihood(self, params, example):
        logits = lambda p, ex: self.model.apply(p, ex["input_ids"][None],
                                                ex["attention_mask"][None])[0]
        return fishmask_lib.label_log_likelihood(logits)(params, example)


class Row(NamedTuple):
    """One configuration: a method ``preset`` with ``options`` (or ``run_steps -> options``) and a
    forward ``mode``, and what only the benchmark needs: the ``torch`` counterpart, a
    ``description``, ``delta_rng`` (pass the step key to the wrapped apply: sampled gates), the
    name of the method's penalty, ``expected_opt_state(delta) -> (bytes excl. scalars, rule)``
    (default: Adam, 2x the trainable bytes), ``info(state, env)`` (extra row fields) and the
    ``optimizer_name(run_steps)`` of a method that wraps the optimizer."""
    preset: str
    options: Any = {}
    mode: str = "factored"
    torch: str | None = None
    description: str | None = None
    delta_rng: bool = False
    penalty_name: str | None = None
    expected_opt_state: Callable[[Any], tuple[int, str]] | None = None
    info: Callable[[dict, BatchEnv], dict[str, Any]] | None = None
    optimizer_name: Callable[[int], str] | None = None


def _adalora_options(run_steps: int) -> dict[str, Any]:
    """The ``adalora`` preset's options for :func:`_adalora_schedule` (its ``steps`` is the
    allocator's ``total_steps``)."""
    sched = _adalora_schedule(run_steps)
    return {"init_r": ADALORA["init_r"], "target_r": ADALORA["target_r"],
            "alpha": float(ADALORA["alpha"]), "steps": sched["total_steps"],
            "t_init": sched["t_init"], "t_final": sched["t_final"], "delta_t": sched["delta_t"]}


def _fisher_info(state: dict, env: BatchEnv) -> dict[str, Any]:
    """The FishMask rows' mask: how it was scored and what it keeps."""
    from jpeft.core import paths as paths_lib
    indices, variables = state["indices"], env.params
    n = min(FISHER_EXAMPLES, env.batch["labels"].shape[0])
    flat_p = paths_lib.flatten(variables)
    in_kernels = sum(int(np.size(i)) for p, i in paths_lib.flatten(indices).items()
                     if p[-1] == "kernel" and np.ndim(flat_p[p]) == 2)
    entries = jpeft.sparse.num_entries(indices)
    return {"mask_scores": f"empirical Fisher (fishmask.fisher_information, chunks of 8) over the "
                           f"first {n} examples of the benchmark batch (random ids and labels)",
            "mask_fisher_s": state["seconds"]["fisher"], "mask_entries": entries,
            "mask_tensors": len(jax.tree_util.tree_leaves(indices)),
            "mask_entries_in_dense_kernels": in_kernels,
            "mask_density_of_selected": entries / (jpeft.num_params(variables)
                                                   - jpeft.num_params(
                                                       variables["params"]["classifier"]))}


def _adalora_expected_opt(delta) -> tuple[int, str]:
    """AdaLoRA's optimizer state (scalars aside): AdamW's two moments of the whole delta, the
    allocator's EMAs I_bar and U_bar of every triplet entry, and a bool [init_r] pattern per matrix."""
    trip = adalora_lib.triplets(delta)
    trip_bytes = jpeft.num_bytes(trip)
    pattern = len(trip) * ADALORA["init_r"]          # bool, one byte each
    return (2 * jpeft.num_bytes(delta) + 2 * trip_bytes + pattern,
            "AdamW 2x trainable + EMAs I_bar, U_bar (2x triplet bytes) + bool rank pattern")


def _diff_pruning_expected_opt(delta) -> tuple[int, str]:
    return (2 * jpeft.num_bytes(delta),
            "Adam 2x trainable, trainable = w + alpha + head (~2x the model, so the state is "
            "~4x the model)")


def _configs() -> dict[str, Row]:
    """Row name -> :class:`Row`: the rows below, then one row (default options, factored) for
    every registered preset that has none, named after it."""
    far_desc = (f"FAR: the {FAR_FRACTION:.0%} highest-magnitude output columns (preset far with "
                f"score='magnitude': no warm-up stage; far_select per matrix) of every FFN matrix "
                f"(intermediate and output dense, 6 layers), their kernel columns and bias entries "
                f"trained as an additive delta, + classifier head trained: "
                f"compose(far=far(columns), head=...)")
    fish_desc = (f"sparse fine-tuning of a fixed FishMask (preset fishmask): the top "
                 f"{SPARSE_DENSITY:.1%} of every parameter but the classifier's by empirical "
                 f"Fisher over the first {FISHER_EXAMPLES} examples of the benchmark batch, "
                 f"trained with fishmask(indices) (a sparse_finetune), + classifier head trained")
    lora = {"rank": RANK, "alpha": float(ALPHA)}
    rows = {
        "full": Row(
            "full", torch="full",
            description="full fine-tuning of every parameter (jpeft.full_finetune(): the delta is "
                        "a trained copy of every param)"),
        "bitfit": Row(
            "bitfit", torch="bitfit",
            description="BitFit on every bias (LayerNorm biases included) + classifier head "
                        "trained: compose(bitfit=bitfit(exclude=('classifier',)), "
                        "head=full_finetune(('classifier',)))"),
        "lora_qv": Row(
            "lora", lora, torch="lora_qv",
            description=f"LoRA on query,value r={RANK} alpha={ALPHA} (factored) + classifier head "
                        "trained: compose(lora=..., head=full_finetune(('classifier',)))"),
        "lora_all_linear": Row(
            "lora-all-linear", lora, torch="lora_all_linear",
            description=f"LoRA on every 2-D kernel except the classifier, r={RANK} alpha={ALPHA} "
                        "(factored) + classifier head trained separately"),
        "lora_qv_materialised": Row(
            "lora", lora, "materialised",
            description="as lora_qv but wrap(mode='materialised'): apply(W0 + s*A@B), so dW0 "
                        "[in, out] is formed in the backward pass (no torch counterpart)"),
        "far": Row(
            "far", {"score": "magnitude", "fraction": FAR_FRACTION},
            description=far_desc + "; factored: y[..., c] += x @ D + d, no [in, out] gradient "
                                   "(no HF PEFT counterpart)"),
        "far_materialised": Row(
            "far", {"score": "magnitude", "fraction": FAR_FRACTION}, "materialised",
            description="as far but wrap(mode='materialised'): apply(W0 + scatter_c(D)), the full "
                        "[in, out] gradient formed and its columns kept (no HF PEFT counterpart)"),
        "fishmask_0.5pct": Row(
            "fishmask", {"density": SPARSE_DENSITY, "fisher_examples": FISHER_EXAMPLES},
            info=_fisher_info,
            description=fish_desc + "; factored: y += scatter_cols(x[..., rows] * v) for Dense "
                                    "kernels, other leaves merged (no HF PEFT counterpart)"),
        "fishmask_0.5pct_materialised": Row(
            "fishmask", {"density": SPARSE_DENSITY, "fisher_examples": FISHER_EXAMPLES},
            "materialised", info=_fisher_info,
            description="as fishmask_0.5pct but wrap(mode='materialised'): apply(W + scatter(idx, "
                        "v)), the full gradient of every masked tensor formed, then gathered (no "
                        "HF PEFT counterpart)"),
        "diff_pruning": Row(
            "diff-pruning", delta_rng=True,
            penalty_name="diff_pruning.l0_penalty(delta['diff_pruning']) (lambda 1.25e-7)",
            expected_opt_state=_diff_pruning_expected_opt,
            description="diff pruning on every parameter but the classifier (the preset's gated "
                        "training stage): W + z*w with hard-concrete gates z sampled at every "
                        "step (delta_rng = the step key, fixed in this benchmark: the same sample "
                        "each step, same cost; always materialised, whatever the mode), loss + "
                        "expected-L0 penalty (l0_penalty, lambda 1.25e-7), + classifier head "
                        "trained; the delta holds w and the gate logits alpha, ~2x the model (no "
                        "HF PEFT counterpart)"),
        "adalora": Row(
            "adalora", _adalora_options, torch="adalora",
            penalty_name="adalora.orthogonality_penalty(delta) (weight 0.5)",
            expected_opt_state=_adalora_expected_opt,
            optimizer_name=lambda run_steps: (
                "adalora_lib.adalora_optimizer(optax.adamw(1e-4, weight_decay=1e-4), "
                f"{_adalora_schedule(run_steps)}) (the method's optimizer wrapper)"),
            description=f"AdaLoRA on query,value, init_r={ADALORA['init_r']} target_r="
                        f"{ADALORA['target_r']} alpha={ADALORA['alpha']} (factored), + classifier "
                        "head trained; optimizer adalora_optimizer(adamw(1e-4), t_init=0, "
                        "delta_t=1: every timed step in the budget-decay phase), loss + "
                        "orthogonality_penalty(delta)"),
        "said_d1000": Row(
            "said", {"d": 1000},
            description="Intrinsic SAID, d=1000 (993 projected coordinates + 7 scalars: 6 layers "
                        "and one group for tensors without a layer index) over every tensor but "
                        "the classifier, Fastfood projection regenerated from the seed inside the "
                        "step, + classifier head trained"),
        "did_d1000": Row(
            "did", {"d": 1000},
            description="Intrinsic DID, d=1000 over every tensor but the classifier, Fastfood "
                        "projection regenerated from the seed inside the step, + classifier head "
                        "trained"),
    }
    covered = {r.preset for r in rows.values()}
    for name in presets.names():
        if name not in covered:
            rows[name.replace("-", "_")] = Row(
                name, description=f"preset {name} with its default options: "
                                  f"{presets.get(name).summary}")
    return rows


def _prepared(row: Row, env: BatchEnv, run_steps: int) -> tuple[dict, dict, presets.Fit]:
    """``(options, state, main stage)``: the stages before the preset's main one run on the
    benchmark batch (once per preset and options: FishMask's Fisher pass serves both its rows)."""
    options = row.options(run_steps) if callable(row.options) else row.options
    preset = presets.get(row.preset)
    options = presets.resolve(preset, options)
    key = (preset.name, repr(sorted(options.items())))
    if key not in _CACHE:
        state = presets.initial_state(env)
        for stage in preset.stages(options):
            if stage.name == preset.main:
                break
            state = presets.run_stage(stage, state, env)
        _CACHE[key] = state
    return options, _CACHE[key], presets.main_stage(preset, options)


# --------------------------------------------------------------------------------------------
# Helpers


def _scalar_bytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
                   if np.ndim(x) == 0))


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _fmt_bytes(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


# --------------------------------------------------------------------------------------------
# JAX side


def _jax_prepare(name: str, spec: Row, env: BatchEnv, run_steps: int,
                 skip_nonfinite: bool = True, *, with_compiled: bool = False,
                 compiler_options: dict | None = None, batches: list[dict] | None = None):
    """Compile the jpeft train step of one configuration (the preset's main stage, its method's
    penalty and optimizer wrapper folded in): ``(row, run_step)`` (and the compiled executable
    with ``with_compiled``). ``run_steps``: how many updates the benchmark will run (AdaLoRA's
    schedule is sized from it). ``compiler_options``: as ``jpeft.make_train_step``'s (``None``:
    jpeft's defaults). ``batches``: host (numpy) batches of ``env.batch``'s shapes, taken in turn
    by the steps through the jitted step as a user's loop calls it (the realistic loop: each step
    copies its batch to the device); ``None``: every step runs the compiled executable on
    ``env.batch``, already on the device."""
    model, variables, sites, batch = env.model, env.params, env.sites, env.batch
    options, state, stage = _prepared(spec, env, run_steps)
    method = stage.method(state)
    f = jpeft.wrap(model.apply, method, sites, mode=spec.mode)
    use_rng = spec.delta_rng

    def loss_fn(params, delta, batch, key):
        # No dropout (deterministic forward); the key only drives the method's own randomness
        # (diff pruning's gate samples) where the configuration asks for it. The method's penalty
        # is added by the train step.
        kw = {"delta_rng": key} if use_rng else {}
        logits = f(params, delta, batch["input_ids"], batch["attention_mask"], **kw)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    delta = presets.start_delta(stage, state, method, env)
    opt_state = jpeft.init_opt_state(opt, delta, method=method)
    step = jpeft.make_train_step(loss_fn, opt, method=method, donate=True,
                                 skip_nonfinite=skip_nonfinite, compiler_options=compiler_options)
    key = jax.random.key(2)

    trainable = jpeft.trainable_count(delta, method)   # SparseAdapter: kept entries only
    trainable_bytes = jpeft.num_bytes(delta)
    opt_bytes = jpeft.num_bytes(opt_state)
    opt_scalar = _scalar_bytes(opt_state)
    if spec.expected_opt_state is not None:
        expected_opt, expected_rule = spec.expected_opt_state(delta)
    else:
        expected_opt, expected_rule = 2 * trainable_bytes, "Adam: 2x trainable bytes"
    penalty = None
    if method.penalty is not None:
        penalty = spec.penalty_name or "method.penalty, added to the loss by the train step"

    t0 = time.perf_counter()
    compiled = step.lower(variables, delta, opt_state, batch, key).compile()
    compile_s = time.perf_counter() - t0
    row: dict[str, Any] = {
        "kind": "train", "config": name, "description": spec.description,
        "preset": spec.preset, "preset_options": options, "preset_stage": stage.name,
        "mode": spec.mode, "method_config": method.config,
        "trainable_params": trainable, "delta_entries": jpeft.num_params(delta), "base_params": jpeft.num_params(variables),
        "trainable_percent": 100.0 * trainable / jpeft.num_params(variables),
        "trainable_bytes": trainable_bytes,
        "opt_state_bytes": opt_bytes, "opt_state_scalar_bytes": opt_scalar,
        "opt_state_ratio": opt_bytes / trainable_bytes,
        "opt_state_ratio_excl_scalars": (opt_bytes - opt_scalar) / trainable_bytes,
        "opt_state_ratio_to_base": opt_bytes / jpeft.num_bytes(variables),
        "opt_state_expected_bytes": expected_opt, "opt_state_expected_rule": expected_rule,
        "penalty": penalty,
        "delta_rng": use_rng,
        "compile_s": compile_s,
    }
    if spec.optimizer_name is not None:
        row["optimizer"] = spec.optimizer_name(run_steps)
    if spec.info is not None:
        row.update(spec.info(state, env))
    row.update(_cost(compiled))
    row.update(_memory(compiled))

    state = {"delta": delta, "opt_state": opt_state}
    del delta, opt_state

    run, feed = _feeder(compiled, step, batch, batches)

    def run_step() -> float:
        """One step (outputs replace the donated inputs); returns the loss (penalty included)."""
        state["delta"], state["opt_state"], metrics = run(
            variables, state["delta"], state["opt_state"], feed(), key)
        jax.block_until_ready((state["delta"], state["opt_state"], metrics))
        return float(metrics["loss"])

    return (row, run_step, compiled) if with_compiled else (row, run_step)


#: Configurations with a hand-written JAX floor (``benchmarks/floor.py``): row -> floor config.
FLOOR = {"full": "full", "bitfit": "bitfit", "lora_qv": "lora_qv",
         "lora_all_linear": "lora_all_linear"}


def _feeder(compiled, jitted, batch, batches: list[dict] | None):
    """``(run, next_batch)`` of a timed step: the compiled executable on the device batch, or
    (``batches``) the jitted function on each host batch in turn, cycled."""
    if batches is None:
        return compiled, lambda: batch
    turn = itertools.count()
    return jitted, lambda: batches[next(turn) % len(batches)]


def _floor_prepare(config: str, env: BatchEnv, layout: str, *, with_compiled: bool = False,
                   batches: list[dict] | None = None):
    """The hand-written step of ``config`` (``floor.make_step``): ``(row fields, run_step)``
    (and the compiled executable with ``with_compiled``); ``batches`` as :func:`_jax_prepare`'s."""
    loaded_config = env.model.config
    frozen, trainable = floor_lib.init(config, env.params["params"], rank=RANK)
    trainable = jax.tree.map(jnp.copy, trainable)      # donated: never the base's own buffers
    opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    step = floor_lib.make_step(opt, heads=loaded_config.num_attention_heads,
                               scale=ALPHA / RANK, layout=layout,
                               compiler_options=xla_options.train_step_options())
    state = {"trainable": trainable, "opt_state": opt.init(trainable)}
    compiled = step.lower(frozen, state["trainable"], state["opt_state"], env.batch).compile()
    cost = _cost(compiled)
    prefix = "floor" if layout == "flat" else f"floor_{layout}"
    row = {f"{prefix}_flops": cost["flops"],
           f"{prefix}_temp_bytes": _memory(compiled)["temp_bytes"],
           f"{prefix}_trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(trainable)))}

    run, feed = _feeder(compiled, step, env.batch, batches)

    def run_step() -> float:
        state["trainable"], state["opt_state"], loss = run(
            frozen, state["trainable"], state["opt_state"], feed())
        return float(jax.block_until_ready(loss))
    return (row, run_step, compiled) if with_compiled else (row, run_step)


#: Configurations also timed without the non-finite check of the train step
#: (``make_train_step(skip_nonfinite=False)``), interleaved with the checked step: its cost.
GUARD_COST = ("full", "lora_qv", "lora_all_linear")

#: The runner of the CPU compile options jpeft's default is timed against, by name: XLA's own
#: defaults while freed host memory goes back to the OS (jpeft's default then has YNNPACK's
#: fusions off), YNNPACK's fusions off once it is retained (jpeft's default is then XLA's).
ALTERNATIVES = {"jax_xla_default": "XLA's defaults", "jax_ynn_off": "YNNPACK's fusions off"}


def _alternative_options() -> tuple[str, dict[str, Any]] | None:
    """``(runner, compile options)`` of :data:`ALTERNATIVES` for this process (CPU only)."""
    if jax.default_backend() != "cpu":
        return None
    if xla_options.train_step_options():
        return "jax_xla_default", {}
    return "jax_ynn_off", {xla_options.YNN_FUSION_TYPE: ""}


#: Configurations whose target is a time relative to full fine-tuning: full fine-tuning's jpeft
#: step is timed in the same alternation (runner ``jax_full``), so the ratio is a paired one.
PAIRED_WITH_FULL = ("lora_all_linear",)

#: How the timed targets are checked: ``jax_over_<runner>_paired``.
PAIRED = "median of the per-round ratios, interleaved"

#: Configurations whose inference forward is measured: LoRA (mergeable: base, merged, factored)
#: and the additive and hybrid methods (factored only, except IA3, which merges).
INFERENCE = ("lora_qv", "lora_all_linear", "ia3", "houlsby", "pfeiffer", "scaled_parallel",
             "compacter", "prefix", "prompt", "mam", "unipelt")


def _inference_rows(name: str, spec: Row, env: BatchEnv, run_steps: int, steps: int,
                    warmup: int) -> list[dict[str, Any]]:
    """The forward pass of the trained-shape delta: XLA FLOPs of base, merged (where the method
    merges) and factored forms, and their median times, the forms timed in alternation with the
    base (time ratios are only meaningful within one run)."""
    model, variables, sites, batch = env.model, env.params, env.sites, env.batch
    _, state, stage = _prepared(spec, env, run_steps)
    method = stage.method(state)
    args = (batch["input_ids"], batch["attention_mask"])
    delta = presets.start_delta(stage, state, method, env)

    base_fn = jax.jit(model.apply)
    base_c = base_fn.lower(variables, *args).compile()
    wrapped = jax.jit(jpeft.wrap(model.apply, method, sites, mode="factored"))
    factored_c = wrapped.lower(variables, delta, *args).compile()
    forms = [("base", base_c, "model.apply(params, batch)", lambda: base_fn(variables, *args)),
             ("factored", factored_c, "jpeft.wrap(model.apply, method)(params, delta, batch)",
              lambda: wrapped(variables, delta, *args))]
    same_tree = None
    if method.merge is not None:
        merge = lambda p, d: method.merge(p, d, sites)
        merged = jax.jit(merge)(variables, delta)
        same_tree = (jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(variables)
                     and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(
                         jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(variables))))
        forms.append(("merged", base_fn.lower(merged, *args).compile(),
                      "model.apply(method.merge(params, delta), batch), merge done once "
                      "beforehand", lambda: base_fn(merged, *args)))
        forms.append(("merge_once", jax.jit(merge).lower(variables, delta).compile(),
                      "method.merge(params, delta) alone (one-time cost)", None))
    runners = {form: (lambda f=fn: float(np.asarray(jax.block_until_ready(f())).ravel()[0]))
               for form, _, _, fn in forms if fn is not None}
    timed = _timed(steps, warmup, runners)

    base = _cost(base_c)["flops"]
    rows = []
    for form, c, note, fn in forms:
        cost = _cost(c)
        ms = timed.get(f"{form}_step_ms") if fn is not None else None
        rows.append({
            "kind": "inference", "config": name, "form": form, "description": note,
            "merges": method.merge is not None,
            "flops": cost["flops"], "transcendentals": cost["transcendentals"],
            "bytes_accessed": cost["bytes_accessed"],
            "ratio_to_base": (cost["flops"] / base if cost["flops"] is not None and base else None),
            "forward_ms": ms,
            "time_ratio_to_base": (ms / timed["base_step_ms"] if ms is not None else None),
            "loadavg_after": timed["loadavg_after"],
            "merged_tree_matches_base": same_tree if form == "merged" else None,
            **_memory(c)})
    return rows


# --------------------------------------------------------------------------------------------
# PyTorch side


#: Untimed pause before each timed step: torch's OpenMP threads spin for a few milliseconds after
#: each parallel region before they sleep (libgomp's spin count), taking a core from whatever
#: runs next; without the pause the runner after torch's step paid for it (3-9% in one run).
PAUSE_S = 0.05


def _timed(steps: int, warmup: int, runners: dict[str, Callable[[], float]]) -> dict[str, Any]:
    """Warm every runner up, then time them in alternation (one step each per round), so that a
    burst of load on a shared machine hits all of them alike. The order turns by one runner each
    round, so no runner always follows the same one (torch's step slows whatever comes right after
    it, pause or not: full fine-tuning's jpeft/floor read 1.06 after torch, 1.03 with the floor
    there, 1.00 without torch). The warm-up steps alternate too, so the shared heap has seen
    every runner's allocations before the first timed step (warmed up runner by runner, the
    first timed step of the first runner took twice its median). Fields ``<name>_step_ms`` etc."""
    losses: dict[str, list[float]] = {n: [] for n in runners}
    times: dict[str, list[float]] = {n: [] for n in runners}
    faults: dict[str, list[int]] = {n: [] for n in runners}
    for _ in range(warmup):
        for n, run in runners.items():
            losses[n].append(run())
    order = list(runners.items())
    for i in range(steps):
        for n, run in order[i % len(order):] + order[:i % len(order)]:
            time.sleep(PAUSE_S)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            losses[n].append(run())
            times[n].append(time.perf_counter() - t0)
            faults[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    out: dict[str, Any] = {"steps": steps, "warmup": warmup, "loadavg_after": _loadavg()}
    for n in runners:
        out.update({f"{n}_step_ms": _median_ms(times[n]), f"{n}_step_ms_min": 1e3 * min(times[n]),
                    f"{n}_step_ms_all": [1e3 * t for t in times[n]],
                    f"{n}_loss_first": losses[n][0], f"{n}_loss_last": losses[n][-1],
                    f"{n}_page_faults": statistics.median(faults[n])})
        if n != "jax" and "jax" in runners:
            # The median of the per-round ratios: the two steps of a round ran back to back,
            # so load that drifts between rounds cancels (the targets are checked on these).
            out[f"jax_over_{n}_paired"] = statistics.median(
                a / b for a, b in zip(times["jax"], times[n]))
    return out


# --------------------------------------------------------------------------------------------
# Output


def _print_train_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'config':<28} {'trainable':>11} {'%':>7} {'GFLOP/step':>10} {'x full':>7} "
            f"{'temp MiB':>9} {'arg MiB':>8} {'out MiB':>8} {'opt/train':>9} "
            f"{'jax ms':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        gf = None if r.get("flops") is None else r["flops"] / 1e9
        print(f"{r['config']:<28} {r['trainable_params']:>11,} {r['trainable_percent']:>7.3f} "
              f"{_fmt(gf, '10.2f'):>10} {_fmt(r.get('flops_ratio_to_full'), '7.3f'):>7} "
              f"{_fmt_bytes(r.get('temp_bytes')):>9} {_fmt_bytes(r.get('argument_bytes')):>8} "
              f"{_fmt_bytes(r.get('output_bytes')):>8} {r['opt_state_ratio']:>9.5f} "
              f"{_fmt(r.get('jax_step_ms'), '8.1f'):>8}")


def _print_time_table(rows: list[dict[str, Any]]) -> None:
    """Step times, median / minimum (ms), of every runner of a configuration, and the ratios."""
    rows = [r for r in rows if any(k in r for k in ("floor_step_ms", "torch_step_ms",
                                                    "jax_unguarded_step_ms"))]
    if not rows:
        return
    ms = lambda r, k: (f"{r[k + '_step_ms']:.0f}/{r[k + '_step_ms_min']:.0f}"
                       if r.get(k + "_step_ms") is not None else "-")
    cols = ("jax", "jax_unguarded", *ALTERNATIVES, "floor", "floor_batched", "torch")
    head = (f"{'config':<18} " + " ".join(f"{c:>15}" for c in cols)
            + f" {'jax/floor':>9} {'jax/torch':>9} {'floor/torch':>11} {'x full':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        x_full = r.get("time_ratio_to_full_paired", r.get("time_ratio_to_full"))
        print(f"{r['config']:<18} " + " ".join(f"{ms(r, c):>15}" for c in cols)
              + f" {_fmt(r.get('jax_over_floor_paired'), '9.3f'):>9}"
              f" {_fmt(r.get('jax_over_torch_paired'), '9.3f'):>9}"
              f" {_fmt(r.get('floor_over_torch'), '11.3f'):>11}"
              f" {_fmt(x_full, '7.3f'):>7}")


def _print_inference_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'config':<21} {'forward':<11} {'GFLOP':>9} {'x base':>8} {'ms':>8} "
            f"{'time x base':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        gf = None if r.get("flops") is None else r["flops"] / 1e9
        print(f"{r['config']:<21} {r['form']:<11} {_fmt(gf, '9.4f'):>9} "
              f"{_fmt(r.get('ratio_to_base'), '8.4f'):>8} {_fmt(r.get('forward_ms'), '8.2f'):>8} "
              f"{_fmt(r.get('time_ratio_to_base'), '11.3f'):>11}")


def _checks(train: dict[str, dict], inference: list[dict]) -> list[dict[str, Any]]:
    out = []
    for name, limit in TARGETS.items():
        r = train.get(name)
        if r is None or r.get("flops_ratio_to_full") is None:
            continue
        v = r["flops_ratio_to_full"]
        out.append({"check": f"{name} FLOPs <= {limit:.2f}x full", "value": v,
                    "passed": v <= limit})
    # Optimizer state against each configuration's own expected size (Adam: 2x the trainable
    # bytes; AdaLoRA adds its EMAs; diff pruning's "trainable" already holds w and alpha).
    for name in [n for n in train if n != "full"] + (["full"] if "full" in train else []):
        r = train[name]
        got = r["opt_state_bytes"] - r["opt_state_scalar_bytes"]
        want = r["opt_state_expected_bytes"]
        out.append({"check": f"{name} optimizer state = {r['opt_state_expected_rule']} "
                             f"(expected {want / r['trainable_bytes']:.4f}x trainable; "
                             f"+{r['opt_state_scalar_bytes']} B of scalars)",
                    "value": r["opt_state_ratio_excl_scalars"], "passed": bool(got == want)})
    for name, r in train.items():
        if r.get("torch_trainable_params") is not None:
            ok = r["torch_trainable_params_excl_pooler"] == r["trainable_params"]
            out.append({"check": f"{name} torch trainable params (excl. pooler) == jax trainable",
                        "value": None, "passed": ok})
    for name, r in train.items():
        if r.get("jax_over_jax_unguarded_paired") is not None:
            v = r["jax_over_jax_unguarded_paired"]
            out.append({"check": f"{name}: skipping non-finite steps costs < 2% (step time with "
                                 f"the check / without, {PAIRED})",
                        "value": v, "passed": v < 1.02})
    for name, r in train.items():
        if r.get("jax_over_floor_paired") is not None:
            v = r["jax_over_floor_paired"]
            out.append({"check": f"{name}: jpeft step <= 1.05x the hand-written JAX floor "
                                 f"({PAIRED})",
                        "value": v, "passed": v <= 1.05})
    for name, r in train.items():
        if r.get("alt_options_runner") is not None:
            v = r["xla_options_time_ratio"]
            other = ALTERNATIVES[r["alt_options_runner"]]
            out.append({"check": f"{name}: jpeft's default compile options no slower than "
                                 f"{other} (+2%; {PAIRED})",
                        "value": v, "passed": v <= 1.02})
    for name in ("lora_qv", "lora_all_linear"):
        r = train.get(name, {})
        if r.get("jax_over_torch_paired") is not None:
            v = r["jax_over_torch_paired"]
            out.append({"check": f"{name}: jpeft step <= 1.0x Hugging Face PEFT (torch) "
                                 f"({PAIRED}; in one process, a diagnostic: isolated.py "
                                 f"gives the figure)",
                        "value": v, "passed": v <= 1.0})
    r = train.get("lora_all_linear", {})
    if r.get("time_ratio_to_full_paired") is not None:
        out.append({"check": f"lora_all_linear step time <= 0.8x full fine-tuning's ({PAIRED})",
                    "value": r["time_ratio_to_full_paired"],
                    "passed": r["time_ratio_to_full_paired"] <= 0.8})
    by = {}
    for r in inference:
        by.setdefault(r["config"], {})[r["form"]] = r
    for name, forms in by.items():
        if "base" in forms and "merged" in forms:
            b, m = forms["base"]["flops"], forms["merged"]["flops"]
            out.append({"check": f"{name} merged inference FLOPs == base FLOPs",
                        "value": None if not b else m / b, "passed": b is not None and m == b})
    return out


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    configs = _configs()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration (10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (2)")
    p.add_argument("--batch", type=int, default=32, help="batch size (32)")
    p.add_argument("--seq", type=int, default=64, help="sequence length (64)")
    p.add_argument("--no-torch", action="store_true",
                   help="skip PyTorch altogether (by default torch only counts the trainable "
                        "parameters and optimizer state of Hugging Face PEFT's set-up)")
    p.add_argument("--torch-in-process", action="store_true",
                   help="also time torch in this process, alternated with the JAX runners (a "
                        "diagnostic: two frameworks in one process slow each other; the "
                        "cross-framework figures come from isolated.py, a process per runner)")
    p.add_argument("--no-floor", action="store_true", help="skip the hand-written JAX floor")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of: " + ", ".join(list(configs) + ["inference"]))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"results file ({DEFAULT_OUT})")
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    host_memory = common.host_memory(args)    # before the first JAX computation
    if args.steps < 1:
        p.error("--steps must be >= 1")

    selected = list(configs) + ["inference"]
    if args.only:
        selected = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in selected if s not in configs and s != "inference"]
        if bad:
            p.error(f"--only: unknown {bad}; choose from {list(configs) + ['inference']}")

    machine = _machine_info(host_memory=host_memory)
    torch_reason = "--no-torch" if args.no_torch else torch_step.available()
    use_torch = torch_reason is None
    if use_torch:
        import torch
        torch.set_num_threads(machine["cpus_usable"] or os.cpu_count() or 1)
        machine["torch_version"] = torch.__version__
        machine["transformers_version"] = __import__("transformers").__version__
        machine["peft_version"] = __import__("peft").__version__
        machine["torch_threads"] = torch.get_num_threads()
    else:
        machine["torch_skipped"] = torch_reason

    model_dir = minilm_dir()
    loaded = load_hf_bert(model_dir, num_labels=NUM_LABELS, pooling="mean")
    model, variables = loaded.model, {"params": loaded.params}
    batch_np = benchmark_batch(loaded.config.vocab_size, args.batch, args.seq, args.seed)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    sites = jpeft.probe(model.apply, variables, batch["input_ids"], batch["attention_mask"])
    env = BatchEnv(model, variables, sites, batch)
    _CACHE.clear()
    run_steps = args.warmup + args.steps
    setup = {"model": "all-MiniLM-L6-v2 (embedded)", "model_dir": str(model_dir),
             "pooling": "mean", "num_labels": NUM_LABELS, "batch": args.batch, "seq": args.seq,
             "optimizer": f"adamw(lr={LR}, weight_decay={WEIGHT_DECAY})", "dropout": 0.0,
             "loss": "softmax cross-entropy", "dtype": "float32",
             "base_params": jpeft.num_params(variables),
             "torch_model": "transformers.BertForSequenceClassification.from_pretrained(model_dir, "
                            "num_labels=2, dropout 0): CLS pooler (pooler.dense + tanh) instead of "
                            "mean pooling; AdamW(lr=1e-4, weight_decay=1e-4)"}
    print(f"jpeft step cost: MiniLM-L6 ({setup['base_params']:,} params), batch {args.batch} x "
          f"seq {args.seq}, {args.steps} timed steps after {args.warmup} warm-up; "
          f"{machine['device_kind']} x{machine['device_count']}, {machine['cpus_usable']} cpus, "
          f"jax {machine['jax_version']}"
          + (f", torch {machine['torch_version']} ({machine['torch_threads']} threads)"
             if use_torch else f"; torch skipped ({torch_reason})"), flush=True)

    train: dict[str, dict[str, Any]] = {}
    train_names = [n for n in configs if n in selected]
    full_flops = None
    if train_names and "full" not in train_names:
        print("[full] compile only, for the FLOPs ratio", flush=True)
        full_flops = _jax_prepare("full", configs["full"], env, run_steps)[0]["flops"]
        gc.collect()
    for name in train_names:
        spec = configs[name]
        print(f"[{name}] jax: compile", flush=True)
        row, jax_step = _jax_prepare(name, spec, env, run_steps)
        runners = {"jax": jax_step}
        if name in GUARD_COST:
            unguarded, runners["jax_unguarded"] = _jax_prepare(name, spec, env, run_steps,
                                                               skip_nonfinite=False)
            row["unguarded_flops"] = unguarded["flops"]
        if name in PAIRED_WITH_FULL:
            runners["jax_full"] = _jax_prepare("full", configs["full"], env, run_steps)[1]
        alt = _alternative_options()
        if name in FLOOR and alt is not None:
            alt_fields, runners[alt[0]] = _jax_prepare(name, spec, env, run_steps,
                                                        compiler_options=alt[1])
            row["alt_options_runner"] = alt[0]
            row["alt_options_temp_bytes"] = alt_fields["temp_bytes"]
        if name in FLOOR and not args.no_floor:
            for layout in floor_lib.LAYOUTS:
                key = "floor" if layout == "flat" else f"floor_{layout}"
                fields, runners[key] = _floor_prepare(FLOOR[name], env, layout)
                row.update(fields)
        finish = None
        row["torch_config"] = spec.torch if use_torch else None
        if use_torch and spec.torch is not None:
            print(f"[{name}] torch: load", flush=True)
            torch_run, finish = torch_step.prepare(spec.torch, model_dir, [batch_np],
                                                   run_steps)
            if args.torch_in_process:
                runners["torch"] = torch_run
            del torch_run
        print(f"[{name}] {' + '.join(runners)}: {args.warmup} warm-up + {args.steps} timed steps"
              + (" each, alternating" if len(runners) > 1 else ""), flush=True)
        row.update(_timed(args.steps, args.warmup, runners))
        if "alt_options_runner" in row:
            row["xla_options_time_ratio"] = row["jax_over_" + row["alt_options_runner"] + "_paired"]
            row["xla_options_temp_ratio"] = row["temp_bytes"] / row["alt_options_temp_bytes"]
        if "jax_full" in runners:
            row["time_ratio_to_full_paired"] = row["jax_over_jax_full_paired"]
        if "jax_unguarded" in runners:
            row["guard_time_ratio"] = row["jax_step_ms"] / row["jax_unguarded_step_ms"]
            row["guard_flops_ratio"] = row["flops"] / row["unguarded_flops"]
        for key in ("floor", "floor_batched"):
            if key in runners:
                row[f"jax_over_{key}"] = row["jax_step_ms"] / row[f"{key}_step_ms"]
                row[f"jax_over_{key}_min"] = row["jax_step_ms_min"] / row[f"{key}_step_ms_min"]
        if "floor" in runners and "jax_unguarded" in runners:
            row["jax_unguarded_over_floor"] = (row["jax_unguarded_step_ms"]
                                               / row["floor_step_ms"])
        if finish is not None:
            row.update(finish())
        if "torch" in runners:
            row["torch_timed"] = "in-process (--torch-in-process)"
            row["jax_over_torch"] = row["jax_step_ms"] / row["torch_step_ms"]
            row["jax_over_torch_min"] = row["jax_step_ms_min"] / row["torch_step_ms_min"]
            if "floor" in runners:
                row["floor_over_torch"] = row["floor_step_ms"] / row["torch_step_ms"]
        if name == "full":
            full_flops = row["flops"]
        train[name] = row
        del runners, jax_step, finish
        gc.collect()
    for row in train.values():
        row["flops_ratio_to_full"] = (row["flops"] / full_flops
                                      if row.get("flops") is not None and full_flops else None)
        if "full" in train:
            row["time_ratio_to_full"] = row["jax_step_ms"] / train["full"]["jax_step_ms"]

    inference: list[dict[str, Any]] = []
    if "inference" in selected:
        for name in INFERENCE:
            print(f"[inference] {name}: base / factored (/ merged) forward", flush=True)
            inference += _inference_rows(name, configs[name], env, run_steps, args.steps,
                                         args.warmup)

    checks = _checks(train, inference)
    rows = []
    for r in list(train.values()) + inference:
        rows.append({**r, "setup": setup, "machine": machine})
    machine["loadavg_end"] = _loadavg()
    rows.append({"kind": "checks", "checks": checks, "setup": setup, "machine": machine})
    out = pathlib.Path(args.out)
    write_jsonl(out, rows)

    print()
    if train:
        print("Training step (XLA cost/memory analysis of the compiled step; times are medians)")
        _print_train_table(list(train.values()))
        print()
        print("Step time, ms median/min of the runners timed in alternation; jax/floor, "
              "jax/torch: median of the per-round ratios; floor/torch: ratio of the medians; "
              "x full: jax time over full fine-tuning's, per-round ratios for "
              f"{', '.join(PAIRED_WITH_FULL)}, else medians of different rounds")
        _print_time_table(list(train.values()))
        print()
    if inference:
        print("Inference forward (XLA FLOPs)")
        _print_inference_table(inference)
        print()
    print("Targets (informational)")
    for c in checks:
        v = "" if c["value"] is None else f" ({c['value']:.4f})"
        print(f"  {'PASS' if c['passed'] else 'MISS'}  {c['check']}{v}")
    print(f"\nwrote {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
