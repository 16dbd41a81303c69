"""The XLA compile options jpeft's train step uses by default, per backend.

On XLA:CPU, while freed host memory goes back to the OS (glibc's default), the step is compiled
with YNNPACK's library fusions off (``xla_cpu_experimental_ynn_fusion_type=""``): XLA's own
kernels then run the matrix products and reductions, and XLA's temporaries fall by 17-26% for
every configuration of the MiniLM train step (``benchmarks/step_cost.py``, static figures from
``memory_analysis()``). Every page of a step's temporaries is then faulted in again each step
(:mod:`jpeft.core.host_memory`; 83,000-168,000 faults per step there), so less temporary memory is
less time: steps timed in alternation with XLA's defaults took 0.94-1.0x their time.

Once :func:`jpeft.retain_host_memory` is in force the pages are reused and the extra temporaries
cost nothing per step; YNNPACK's fusions are then the faster kernels (XLA's defaults took
0.91-1.0x the time of YNNPACK off in three runs), so the step gets XLA's defaults. Other backends
get no options. Numbers: ``benchmarks/README.md``.

The defaults stand aside when the user has chosen: a ``compiler_options`` given to
:func:`jpeft.make_train_step` (``{}`` means XLA's defaults), or the option named in the
``XLA_FLAGS`` environment variable. A jaxlib that does not know the option (it is experimental)
gets no options: each default is tried once on a one-element program before it is used.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.core import host_memory

#: The XLA:CPU option that selects which operations go to YNNPACK fusions.
YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"

#: Default train-step compile options per backend (``jax.default_backend()`` names), while freed
#: host memory is returned to the OS; with it retained (``host_memory.retained()``) there are none.
TRAIN_STEP_OPTIONS: dict[str, dict[str, Any]] = {"cpu": {YNN_FUSION_TYPE: ""}}


@functools.lru_cache(maxsize=None)
def accepted(name: str, value: Any) -> bool:
    """Whether this jaxlib compiles a program with the option ``name=value`` (tried once)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(
            jnp.zeros((), jnp.float32)).compile()
    except Exception:          # noqa: BLE001 (an unknown option is reported in several types)
        return False
    return True


def train_step_options(backend: str | None = None) -> dict[str, Any]:
    """The compile options :func:`jpeft.make_train_step` uses when given none: those of
    :data:`TRAIN_STEP_OPTIONS` for ``backend`` (default: ``jax.default_backend()``) that the
    user has not set in ``XLA_FLAGS`` and this jaxlib accepts; none once
    :func:`jpeft.retain_host_memory` is in force (module docstring)."""
    backend = backend or jax.default_backend()
    if host_memory.retained():
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in TRAIN_STEP_OPTIONS.get(backend, {}).items()
            if f"--{k}" not in flags and accepted(k, v)}
