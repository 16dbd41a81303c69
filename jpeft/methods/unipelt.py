"""UniPELT (Mao et al., 2022, arXiv 2110.07577): LoRA, prefix tuning and a bottleneck adapter,
each scaled by a learned gate.

``unipelt()`` composes, as ``{"lora", "prefix", "adapter"}``:

* LoRA on the query and value projections (``r = 8``, ``alpha = 2``), its update times
  ``G_L = mean_tokens sigmoid(x W + b)`` from the projection's input (the attention's input);
* prefix tuning (``l = 10``, trained through the reparametrisation MLP), ``P_k`` and ``P_v`` times
  ``G_P`` (two values) from the attention's input;
* a sequential bottleneck adapter after the FFN (reduction factor 16, ReLU), its output times
  ``G_A`` from the adapter's input;

all as AdapterHub's ``UniPELTConfig`` (gates per example: the sigmoid averaged over tokens,
:mod:`jpeft.core.gates`). ``gate=False`` is the paper's NoGate ablation: the plain composition.
Gated LoRA cannot be merged (nor can prefix or adapter): UniPELT runs factored only.

:func:`gate_values` returns every gate per layer and example for a batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from jpeft.core import gates as gates_lib
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib
from jpeft.methods import adapters as adapters_lib
from jpeft.methods import lora as lora_lib
from jpeft.methods import prefix as prefix_lib

#: Query and value projections in Hugging Face naming (BERT and LLaMA).
QUERY_VALUE = r"(.*/)?(query|value|q_proj|v_proj)"


def unipelt(*, gate: bool = True, lora_targets: Any = QUERY_VALUE, lora_rank: int = 8,
            lora_alpha: float = 2.0, prefix_length: int = 10, prefix_hidden_size: int = 512,
            reparametrize: bool = True, reduction_factor: int = 16,
            activation: str = "relu") -> method_lib.Method:
    """UniPELT (module docstring); ``gate=False`` for NoGate."""
    return method_lib.compose(
        lora=lora_lib.lora(lora_targets, rank=lora_rank, alpha=lora_alpha, gate=gate),
        prefix=prefix_lib.prefix_tuning(prefix_length, reparametrize=reparametrize,
                                        hidden_size=prefix_hidden_size, gate=gate),
        adapter=adapters_lib.bottleneck((adapters_lib.FFN_SEQUENTIAL,),
                                        reduction_factor=reduction_factor, activation=activation,
                                        gate=gate))


def _gates_over_layers(x, w, b) -> jax.Array:
    """:func:`gates_lib.example_gates` over leading stacked axes: ``x [*L, B, ..., d]``,
    ``w [*L, d, g]``, ``b [*L, g]`` -> ``[*L, B, g]``."""
    if w.ndim == 2:
        return gates_lib.example_gates(x, w, b)
    return jax.vmap(_gates_over_layers)(x, w, b)


def gate_values(apply_fn: Callable[..., Any], method: method_lib.Method, sites: sites_lib.Sites
                ) -> Callable[..., dict]:
    """``f(params, delta, *args) -> {"lora": {weight: [*L, B]}, "prefix": {attention: [*L, B,
    2]}, "adapter": {site: [*L, B]}}``: the gate of every part, per layer (``[L]`` leading for a
    layer stack) and example, on the batch ``args``, as the gated forward pass computes them."""
    parts = method.config.get("compose", {})
    if not all(parts.get(n, {}).get("gate") for n in ("lora", "prefix", "adapter")):
        raise ValueError("gate_values: the method is not a gated unipelt() (gate=False has no "
                         "gates)")

    def values(params, delta, *args, **kwargs):
        flat_l = paths_lib.flatten(delta["lora"])
        lora_in = {p[:-1]: sites_lib.module_mark(sites, p[:-1], "in")
                   for p in flat_l if p[-1] == lora_lib.GATE_NAME}
        atts = prefix_lib.attentions(sites)
        ad = adapters_lib.resolve(sites, [adapters_lib.FFN_SEQUENTIAL])
        keys = (list(lora_in.values()) + [(a.scope, "in") for a in atts]
                + [s.inp or s.out for s in ad])
        _, seen = method_lib.observe(apply_fn, method, sites, keys)(params, delta, *args,
                                                                      **kwargs)
        pre = paths_lib.flatten(delta["prefix"].get("gates", delta["prefix"]))
        flat_a = paths_lib.flatten(delta["adapter"])
        return {
            "lora": {p: _gates_over_layers(seen[k], flat_l[p + (lora_lib.GATE_NAME,)],
                                           flat_l[p + (lora_lib.GATE_BIAS_NAME,)])[..., 0]
                     for p, k in lora_in.items()},
            "prefix": {a.scope: _gates_over_layers(
                seen[(a.scope, "in")], pre[a.scope + (prefix_lib.GATE_NAME,)],
                pre[a.scope + (prefix_lib.GATE_BIAS_NAME,)]) for a in atts},
            "adapter": {s.out: _gates_over_layers(
                seen[s.inp or s.out], flat_a[s.out[0] + (s.out[1], "gate")],
                flat_a[s.out[0] + (s.out[1], "gate_bias")])[..., 0] for s in ad}}
    return values

