"""One module per PEFT method family, and :func:`from_config`: a method rebuilt from the
``config`` it saved (``method.config``, stored in every checkpoint's metadata)."""

from __future__ import annotations

from typing import Any, Callable

from jpeft.core import method as method_lib

#: Methods whose config holds data rather than hyper-parameters (selected columns or entries):
#: they are rebuilt from their stored form, not from the config alone.
_DATA = {
    "far": "FAR's columns are data: restore the stored form and rebuild with "
           "far(*far_unpack(stored)) (jpeft.methods.far)",
    "sparse": "the sparse entries are data: restore the stored form and run it with "
              "jpeft.sparse.stored_method()",
    "fishmask": "FishMask's mask is data: restore the stored form and run it with "
                "jpeft.sparse.stored_method()",
    "sparse_stored": "rebuild with jpeft.sparse.stored_method()",
}


def _factories() -> dict[str, Callable[[dict], method_lib.Method]]:
    from jpeft.methods import adalora, adapters, bitfit, diff_pruning, full, ia3, intrinsic, lora
    from jpeft.methods import prefix, prompt, sparse_adapter

    def keywords(fn, drop=("method", "scaling")):
        return lambda c: fn(**{k: v for k, v in c.items() if k not in drop})
    return {
        "lora": keywords(lora.lora), "adalora": keywords(adalora.adalora),
        "bitfit": keywords(bitfit.bitfit), "full": keywords(full.full_finetune),
        "diff_pruning": keywords(diff_pruning.diff_pruning),
        "did": intrinsic.from_config, "said": intrinsic.from_config,
        "bottleneck": adapters.from_config, "ia3": ia3.from_config,
        "prefix": prefix.from_config, "prompt": prompt.from_config,
        "sparse_adapter": sparse_adapter.from_config,
    }


def from_config(config: dict[str, Any]) -> method_lib.Method:
    """The method ``config`` describes (``compose`` configs part by part).

    Raises:
      ValueError: an unknown method, or one whose selection is data (FAR, sparse, FishMask), with
        how to rebuild it.
    """
    if "compose" in config:
        return method_lib.compose(**{n: from_config(c) for n, c in config["compose"].items()})
    kind = config.get("method")
    if kind in _DATA:
        raise ValueError(f"from_config: {kind!r} cannot be rebuilt from its config: {_DATA[kind]}")
    factories = _factories()
    if kind not in factories:
        raise ValueError(f"from_config: unknown method {kind!r}; known: {sorted(factories)}")
    return factories[kind](config)
