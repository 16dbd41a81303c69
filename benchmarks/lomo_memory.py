"""Memory of LOMO and AdaLomo (``jpeft.lomo``) against SGD and AdamW full fine-tuning.

The NNX LLaMA decoder (``jpeft.models.llama.LlamaForCausalLM``, random weights, float32, 4 query
/ 2 key-value heads, untied ``lm_head``) in two shapes (``--models``): ``tiny`` (hidden 128,
intermediate 256, vocabulary 1024: 590,848 bytes of parameters per layer, a table 524,288) and
``wide-vocab`` (hidden 256, intermediate 688, vocabulary 32,000: 2.9 MB per layer, a table
32.8 MB, 11 layers' worth, as small LLMs have: Qwen2.5-0.5B's table is 9 of its layers), at
several depths, in both layer layouts (unrolled ``nnx.List`` and ``scan_layers=True``), one
synthetic batch of random tokens, next-token cross-entropy. Two batch shapes: ``1x32`` (parameters dominate, LOMO's setting: a large model, a small batch) and
``4x64`` (activations dominate). For every configuration the train step is compiled (not run) and
its ``memory_analysis()`` (temporaries, arguments, outputs, aliased bytes) and ``cost_analysis()``
FLOPs are recorded (XLA counts a ``while`` loop's body once: the scanned rows' FLOPs do not grow
with depth):

* ``sgd``, ``adamw``: full fine-tuning with jpeft's own step (``jpeft.make_train_step`` over
  ``jpeft.full_finetune()``'s delta, ``optax.sgd(1e-2)`` / ``optax.adamw(1e-4)``, delta and
  optimizer state donated, no non-finite skipping);
* ``sgd_clip``: the same with ``optax.clip_by_global_norm(1.0)`` first (the clip needs every
  gradient before any update);
* ``lomo``: ``jpeft.lomo.lomo(1e-2)``, one backward pass with the update fused into it;
* ``lomo_clip``: ``lomo(1e-2, clip_grad_norm=1.0)``: a first backward pass for the global norm,
  then the fused pass;
* ``adalomo``: ``jpeft.lomo.adalomo(1e-3)``;
* ``forward``: the loss alone;
* ``forward_residuals``: the forward pass that keeps the activations (``jax.vjp``'s forward,
  returning its residuals): ``forward_peak_bytes`` = its temporaries + the residuals it returns,
  what the forward pass of any training step holds at its peak. Optimizer rows carry
  ``temp_above_forward_peak`` = their temporaries less that;
* ``*_lm_loss``: the same with the head and the loss computed together in vocabulary chunks of
  4,096 (``jpeft.lm_cross_entropy`` on the decoder body's hidden states; no logits ``[B, T, V]``
  or their cotangent), against ``forward_residuals_lm_loss``, that loss's forward peak.

Every row carries the gradient's bytes (all parameters), those of the layer-stacked leaves, the
largest leaf, the largest layer (one decoder layer's parameters, or the embedding or head when
larger) and ``residual_bytes``: the residuals JAX's differentiation keeps (the forward's
activations), with ``temp_minus_residuals``. LOMO rows add ``temp_saved_vs_<reference>``.
``kind: "slope"`` rows give, per layout, batch and configuration, the temporaries added per
layer between the smallest and the largest depth.

Usage::

    python benchmarks/lomo_memory.py                         # both models, depths 2, 4, 8, both layouts
    python benchmarks/lomo_memory.py --models wide-vocab --batches 1x32
    python benchmarks/lomo_memory.py --depths 2,4 --layouts scanned --batches 1x32 --out /tmp/x.jsonl

Rows go to ``--out`` (default ``benchmarks/results/lomo_memory.jsonl``, rewritten each run).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import optax

import common  # noqa: E402  (benchmarks/common.py)
from common import machine, write_jsonl  # noqa: E402

import jpeft  # noqa: E402
from jpeft import lomo  # noqa: E402
from jpeft.core import paths as paths_lib  # noqa: E402
from jpeft.core import xla_options  # noqa: E402
from jpeft.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "lomo_memory.jsonl"
CONFIGS = ("sgd", "sgd_clip", "adamw", "lomo", "lomo_clip", "adalomo", "forward",
           "forward_residuals", "sgd_lm_loss", "lomo_lm_loss", "adalomo_lm_loss",
           "forward_residuals_lm_loss")
LAYOUTS = ("unrolled", "scanned")


MODELS = {"tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256),
          "wide-vocab": dict(vocab_size=32000, hidden_size=256, intermediate_size=688)}


def config(depth: int, scan: bool, model: str = "tiny") -> LlamaConfig:
    return LlamaConfig(**MODELS[model], num_hidden_layers=depth, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, scan_layers=scan)


def ce(logits, tokens):
    """Next-token cross-entropy: ``logits[:, :-1]`` against ``tokens[:, 1:]``."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def layer_bytes(params, depth: int, scan: bool) -> int:
    """Bytes of the largest unit updated at once: one decoder layer's parameters (a stacked
    leaf's slice), or a non-layer leaf (embedding, head) when larger."""
    per_layer: dict = {}
    other = 0
    for path, x in paths_lib.flatten(params).items():
        if path[:2] == ("model", "layers"):
            if scan:
                per_layer[0] = per_layer.get(0, 0) + x.nbytes // depth
            else:
                per_layer[path[2]] = per_layer.get(path[2], 0) + x.nbytes
        else:
            other = max(other, x.nbytes)
    return max(max(per_layer.values(), default=0), other)


def residual_bytes(apply, params, tokens) -> int:
    """Bytes of the residuals JAX's own differentiation keeps for the backward pass of the loss
    with respect to every parameter (``jax.vjp``'s function is a pytree of them; inputs it keeps
    are not counted): the forward's activations."""
    loss = lambda p: ce(apply(p, tokens), tokens)
    closed = jax.make_jaxpr(lambda p: jax.tree.leaves(jax.vjp(loss, p)[1]))(params)
    inputs = set(closed.jaxpr.invars)
    return sum(v.aval.size * v.aval.dtype.itemsize for v in closed.jaxpr.outvars
               if hasattr(v, "aval") and not hasattr(v, "val") and v not in inputs)


def measure(compiled) -> dict:
    return {**common.memory(compiled), **common.cost(compiled)}


def chunked_loss(body):
    """Next-token cross-entropy with the head in ``jpeft.lm_cross_entropy``: ``body(params
    ["model"], tokens)`` gives the hidden states."""
    def loss(p, t):
        hidden, _ = body(p["model"], t)
        return jpeft.lm_cross_entropy(hidden[:, :-1], p["lm_head"]["kernel"], t[:, 1:],
                                      chunk=4096)
    return loss


def compile_config(name: str, apply, params, tokens, options, body=None) -> tuple[dict, dict]:
    """``(measurements, extra)`` of one configuration's compiled step (``*_lm_loss``: with
    :func:`chunked_loss` of ``body``)."""
    if name.endswith("_lm_loss"):
        loss_of, name = chunked_loss(body), name[:-len("_lm_loss")]
    else:
        loss_of = lambda p, t: ce(apply(p, t), t)
    method = jpeft.full_finetune()
    extra: dict = {}
    if name in ("sgd", "sgd_clip", "adamw"):
        tx = {"sgd": optax.sgd(1e-2), "adamw": optax.adamw(1e-4),
              "sgd_clip": optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-2))}[name]
        step = jpeft.make_train_step(
            lambda p, d, b, k: loss_of(method.merge(p, d), b), tx, skip_nonfinite=False)
        delta = method.init(jax.random.key(0), params)
        lowered = step.lower(params, delta, tx.init(delta), tokens, jax.random.key(0))
    elif name in ("lomo", "lomo_clip", "adalomo"):
        opt = {"lomo": lomo.lomo(1e-2), "lomo_clip": lomo.lomo(1e-2, clip_grad_norm=1.0),
               "adalomo": lomo.adalomo(1e-3)}[name]
        step = lomo.make_step(loss_of, opt)
        plan = step.plan(params, tokens)
        extra = {"fused_scan_leaves": len(plan.fused_scan),
                 "fused_op_leaves": len(plan.fused_op), "whole_leaves": len(plan.whole),
                 "unused_leaves": len(plan.unused)}
        lowered = step.lower(params, step.init(params, tokens), tokens)
    elif name == "forward":
        lowered = jax.jit(loss_of, compiler_options=options or None).lower(params, tokens)
    elif name == "forward_residuals":
        def forward(p, t):
            kept = jax.tree.leaves(jax.vjp(lambda q: loss_of(q, t), p)[1])
            inputs = {id(x) for x in jax.tree.leaves(p)}
            return [x for x in kept if id(x) not in inputs]
        lowered = jax.jit(forward, compiler_options=options or None).lower(params, tokens)
    else:
        raise ValueError(name)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    return {**measure(compiled), "compile_s": round(time.perf_counter() - t0, 3)}, extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--depths", default="2,4,8")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--batches", default="1x32,4x64", help="comma-separated BATCHxSEQ shapes")
    p.add_argument("--only", default=None, help="comma-separated subset of " + ", ".join(CONFIGS))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    common.add_host_memory_flag(p)
    args = p.parse_args(argv)
    host_memory = common.host_memory(args)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    shapes = [tuple(int(n) for n in b.split("x")) for b in args.batches.split(",") if b.strip()]
    names = CONFIGS if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = ([n for n in names if n not in CONFIGS] + [l for l in layouts if l not in LAYOUTS]
           + [m for m in models if m not in MODELS])
    if bad:
        p.error(f"unknown {bad}; configs {CONFIGS}, layouts {LAYOUTS}, models {tuple(MODELS)}")
    options = xla_options.train_step_options()
    info = machine(host_memory=host_memory, compiler_options=options)
    rows = []
    for model, (batch, seq) in ((m, b) for m in models for b in shapes):
        tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0,
                                    MODELS[model]["vocab_size"])
        for layout in layouts:
            for depth in depths:
                cfg = config(depth, layout == "scanned", model)
                net = LlamaForCausalLM(cfg)
                apply, params = jpeft.nnx.split(net)
                body, _ = jpeft.nnx.split(net.model)
                flat = paths_lib.flatten(params)
                sizes = {
                    "params": sum(x.size for x in flat.values()),
                    "gradient_bytes": sum(x.nbytes for x in flat.values()),
                    "stacked_gradient_bytes": sum(x.nbytes for k, x in flat.items()
                                                  if layout == "scanned"
                                                  and k[:2] == ("model", "layers")),
                    "largest_leaf_bytes": max(x.nbytes for x in flat.values()),
                    "largest_layer_bytes": layer_bytes(params, depth, layout == "scanned"),
                    "residual_bytes": residual_bytes(apply, params, tokens)}
                by_name = {}
                for name in names:
                    print(f"[{model}, {batch}x{seq}, {layout}, depth {depth}] {name}",
                          flush=True)
                    measured, extra = compile_config(name, apply, params, tokens, options,
                                                     body)
                    row = {"kind": "memory", "model": model, "batch": batch, "seq": seq,
                           "layout": layout, "depth": depth, "config": name, **sizes,
                           **measured, **extra,
                           "temp_minus_residuals": measured["temp_bytes"]
                           - sizes["residual_bytes"],
                           "setup": {"model": dataclasses.asdict(cfg), "dtype": "float32"},
                           **info}
                    by_name[name] = row
                    rows.append(row)
                for suffix in ("", "_lm_loss"):
                    fr = by_name.get("forward_residuals" + suffix)
                    if fr is None:
                        continue
                    peak = fr["temp_bytes"] + fr["output_bytes"]
                    for name, row in by_name.items():
                        if (not name.startswith("forward")
                                and name.endswith("_lm_loss") == bool(suffix)):
                            row["forward_peak_bytes"] = peak
                            row["temp_above_forward_peak"] = row["temp_bytes"] - peak
                for name in ("lomo", "lomo_clip", "adalomo"):
                    for ref in ("sgd", "sgd_clip", "adamw"):
                        if name in by_name and ref in by_name:
                            by_name[name][f"temp_saved_vs_{ref}"] = (
                                by_name[ref]["temp_bytes"] - by_name[name]["temp_bytes"])
            if len(depths) > 1:
                lo, hi = min(depths), max(depths)
                mine = [r for r in rows if r["kind"] == "memory" and r["layout"] == layout
                        and (r["model"], r["batch"], r["seq"]) == (model, batch, seq)]
                grad = {r["depth"]: r["gradient_bytes"] for r in mine}
                for name in names:
                    t = {r["depth"]: r["temp_bytes"] for r in mine if r["config"] == name}
                    rows.append({"kind": "slope", "model": model, "batch": batch, "seq": seq,
                                 "layout": layout, "config": name, "depths": [lo, hi],
                                 "temp_bytes_per_layer": (t[hi] - t[lo]) / (hi - lo),
                                 "param_bytes_per_layer": (grad[hi] - grad[lo]) / (hi - lo)})
    for r in rows:
        if r["kind"] == "memory":
            print(f"{r['model']:>10} {r['batch']}x{r['seq']} {r['layout']:>8} L={r['depth']} "
                  f"{r['config']:>9}: "
                  f"temp {r['temp_bytes']:>11,} (-resid {r['temp_minus_residuals']:>11,}) "
                  f"args {r['argument_bytes']:>11,} out {r['output_bytes']:>11,} "
                  f"alias {r['alias_bytes']:>11,} flops {r['flops'] or 0:>14,.0f}")
        else:
            print(f"{r['model']:>10} {r['batch']}x{r['seq']} {r['layout']:>8} slope "
                  f"{r['config']:>9}: "
                  f"{r['temp_bytes_per_layer']:>11,.0f} bytes/layer")
    write_jsonl(pathlib.Path(args.out), rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
