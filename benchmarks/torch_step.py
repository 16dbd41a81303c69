"""The Hugging Face PEFT (PyTorch) side of the step-cost benchmarks, importable without JAX.

A torch runner must be timeable in a process that never imported JAX or jpeft (``isolated.py``):
two frameworks in one process slow each other (thread pools, the allocator settings jpeft applies
on import). So the torch training step, the benchmark batch and the settings both sides share
(learning rate, weight decay, LoRA rank and alpha, AdaLoRA's budget) live here; ``step_cost.py``
imports them.
"""

from __future__ import annotations

import pathlib
import warnings
from typing import Any, Callable, Sequence

import numpy as np

LR = 1e-4
WEIGHT_DECAY = 1e-4          # optax.adamw's default; torch AdamW is given the same value
RANK, ALPHA = 8, 8
NUM_LABELS = 2
ADALORA = dict(init_r=12, target_r=8, alpha=8)


def adalora_schedule(run_steps: int) -> dict[str, int]:
    """AdaLoRA's schedule for a benchmark that runs ``run_steps`` updates (warm-up + timed), the
    same in jpeft and in Hugging Face PEFT: ``t_init = 0`` and ``total_steps`` large enough that every
    step run lies in the budget-decay phase, with a masking decision at every step (``delta_t = 1``,
    PEFT's default ``deltaT``). There PEFT does the most work per step (``update_ipt`` and
    ``mask_to_budget``), which is the work the compiled jpeft step does at every step whatever the
    phase (the phases are selected with ``jnp.where``, all branches computed)."""
    total = max(1000, 5 * run_steps)
    return {"total_steps": total, "t_init": 0, "t_final": total // 5, "delta_t": 1}


def benchmark_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The benchmark's batch: random token ids in ``[1000, vocab)``, an all-ones mask and random
    labels, ``[batch, seq]`` int32 (numpy)."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1000, vocab_size, (batch, seq), dtype=np.int32),
            "attention_mask": np.ones((batch, seq), np.int32),
            "labels": rng.integers(0, NUM_LABELS, (batch,), dtype=np.int32)}


def available() -> str | None:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:   # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def prepare(kind: str, model_dir: pathlib.Path, batches: Sequence[dict[str, np.ndarray]],
            run_steps: int) -> tuple[Callable[[], float], Callable[[], dict[str, Any]]]:
    """The Hugging Face counterpart of one configuration: ``(run_step, finish)``.

    ``batches``: host batches (``input_ids``, ``attention_mask``, ``labels``; numpy), taken in
    turn by the steps (cycled). One batch: it is converted to tensors once. Several (the
    realistic loop): each step converts its batch from numpy, as a user's loop over a data
    loader does. ``run_step`` returns the loss as a Python float (read back every step)."""
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(0)
    # Dropout off, as in the JAX forward (deterministic=True): same arithmetic in both.
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(model_dir), num_labels=NUM_LABELS, local_files_only=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "full":
        pass
    elif kind == "bitfit":
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(".bias") or n.startswith("classifier."))
    elif kind in ("lora_qv", "lora_all_linear"):
        cfg = peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
            target_modules=["query", "value"] if kind == "lora_qv" else "all-linear",
            modules_to_save=["classifier"])
        with warnings.catch_warnings():   # transformers' deprecation notices raised by peft
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, cfg)
    elif kind == "adalora":
        sched = adalora_schedule(run_steps)
        cfg = peft.AdaLoraConfig(
            init_r=ADALORA["init_r"], target_r=ADALORA["target_r"], lora_alpha=ADALORA["alpha"],
            lora_dropout=0.0, target_modules=["query", "value"], total_step=sched["total_steps"],
            tinit=sched["t_init"], tfinal=sched["t_final"], deltaT=sched["delta_t"],
            modules_to_save=["classifier"], task_type="SEQ_CLS")
        # task_type="SEQ_CLS" makes get_peft_model return a PeftModelForSequenceClassification,
        # whose forward goes through AdaLoraModel.forward, which adds the orthogonality penalty to
        # the loss. Without it (a plain PeftModel) forward calls the transformers model directly
        # and the penalty is silently left out (peft 0.21). The trainable set is the same.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = peft.get_peft_model(model, cfg)
    else:
        raise ValueError(kind)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = int(sum(p.numel() for p in params))
    # HF BertForSequenceClassification pools with its CLS pooler (pooler.dense + tanh) where the
    # JAX model uses mean pooling (no parameters): the pooler's trainable entries explain the
    # difference in trainable counts between the two frameworks.
    pooler = int(sum(p.numel() for n, p in model.named_parameters()
                     if p.requires_grad and ".pooler." in f".{n}"))
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    as_tensors = lambda b: {k: torch.from_numpy(np.asarray(v)).long() for k, v in b.items()}
    if not batches:
        raise ValueError("prepare: no batches")
    fixed = as_tensors(batches[0]) if len(batches) == 1 else None

    count = [0]

    def step():
        inputs = fixed if fixed is not None else as_tensors(batches[count[0] % len(batches)])
        opt.zero_grad(set_to_none=True)
        # With labels, AdaLoraModel.forward adds its orthogonality penalty to out.loss itself.
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    labels=inputs["labels"])
        out.loss.backward()
        opt.step()
        count[0] += 1
        if kind == "adalora":       # after the optimizer step, before the next zero_grad (PEFT docs)
            model.base_model.update_and_allocate(count[0])
        return float(out.loss.detach())

    def finish() -> dict[str, Any]:
        opt_bytes = 0
        for st in opt.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    opt_bytes += v.numel() * v.element_size()
        out = {"torch_trainable_params": trainable,
               "torch_trainable_pooler_params": pooler,
               "torch_trainable_params_excl_pooler": trainable - pooler,
               "torch_opt_state_bytes": int(opt_bytes),
               "torch_threads": torch.get_num_threads()}
        if kind == "adalora":       # the rank allocator's state lives outside the optimizer
            ra = model.base_model.rankallocator
            out["torch_rankallocator_bytes"] = int(sum(
                v.numel() * v.element_size() for d in (ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc)
                for v in d.values()))
            out["torch_adalora_schedule"] = adalora_schedule(run_steps)
            out["torch_peft_model_class"] = type(model).__name__
        return out

    return step, finish


#: torch operators by what they compute (self CPU time is summed per category).
OP_CATEGORIES = (
    ("products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("attention core", ("aten::_scaled_dot_product", "aten::_softmax")),
    ("GELU", ("aten::gelu",)),
    ("layer norm", ("aten::native_layer_norm",)),
    ("optimizer", ("Optimizer.", "aten::_foreach_", "aten::_fused_adamw")),
    ("copies", ("aten::copy_", "aten::clone", "aten::contiguous")),
)


def op_category(name: str) -> str:
    """The :data:`OP_CATEGORIES` category of a torch operator name (``"other"`` if none)."""
    for category, prefixes in OP_CATEGORIES:
        if name.startswith(prefixes):
            return category
    return "other"


def profile(kind: str, model_dir: pathlib.Path, batch_np: dict[str, np.ndarray], *,
            warmup: int = 3, threads: int | None = None) -> dict[str, Any]:
    """One step of ``kind`` under ``torch.profiler`` (CPU) after ``warmup`` steps: the step's wall
    time, self CPU time per :data:`OP_CATEGORIES` category and per operator (ms)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity
    if threads is not None:
        torch.set_num_threads(threads)
    step, _ = prepare(kind, model_dir, [batch_np], warmup + 1)
    for _ in range(warmup):
        step()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            ops[e.key] = e.self_cpu_time_total / 1e3
    by: dict[str, float] = {}
    for name, ms in ops.items():
        by[op_category(name)] = by.get(op_category(name), 0.0) + ms
    return {"wall_ms": 1e3 * wall, "categories_ms": by,
            "ops_ms": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "threads": torch.get_num_threads()}


if __name__ == "__main__":      # python benchmarks/torch_step.py --profile KIND MODEL_DIR [B T]
    import json
    import sys
    if len(sys.argv) < 4 or sys.argv[1] != "--profile":
        raise SystemExit("usage: torch_step.py --profile KIND MODEL_DIR [BATCH SEQ THREADS]")
    kind, model_dir = sys.argv[2], pathlib.Path(sys.argv[3])
    given = [int(x) for x in sys.argv[4:7]]
    b, t, threads = given + [32, 64, 2][len(given):]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    print("RESULT " + json.dumps(profile(kind, model_dir, benchmark_batch(vocab, b, t),
                                         threads=threads)))
