"""One module per PEFT method family, and :func:`from_config`: a method rebuilt from the
``config`` it saved (``method.config``, stored in every checkpoint's metadata)."""

from __future__ import annotations

from typing import Any, Callable

from jpeft.core import method as method_lib

#: Methods defined by data as well as hyper-parameters (``method.data``: selected columns or
#: entries): rebuilt by ``from_config(config, data)``.
def _data_factories() -> dict[str, Callable[[dict, Any], method_lib.Method]]:
    from jpeft.core import sparse
    from jpeft.methods import far, fishmask
    return {
        "far": lambda c, d: far.far(d, train_bias=c["train_bias"], bias_name=c["bias_name"],
                                    name=c.get("name", "far")),
        "sparse": lambda c, d: sparse.sparse_finetune(d, name=c["name"]),
        "fishmask": lambda c, d: fishmask.fishmask(d, name=c["name"]),
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


def from_config(config: dict[str, Any], data: Any = None) -> method_lib.Method:
    """The method ``config`` (``method.config``) describes, with ``data`` (``method.data``) for the
    methods defined by data (FAR's columns, sparse and FishMask entries); ``compose`` and
    ``active`` configs part by part (``data``: ``{part: data}`` for the parts that have some).

    Raises:
      ValueError: an unknown method, or a data-defined one without its ``data``.
    """
    for key, combine in (("compose", method_lib.compose), ("active", method_lib.active)):
        if key in config:
            data = data or {}
            return combine(**{n: from_config(c, data.get(n)) for n, c in config[key].items()})
    kind = config.get("method")
    with_data = _data_factories()
    if kind in with_data:
        if data is None:
            raise ValueError(f"from_config: {kind!r} is defined by data (method.data: its "
                             f"selected {'columns' if kind == 'far' else 'entries'}) as well as its "
                             f"config: pass from_config(config, data), or load it with jpeft.load")
        return with_data[kind](config, data)
    if kind == "sparse_stored":
        from jpeft.core import sparse
        return sparse.stored_method(name=config["name"])
    factories = _factories()
    if kind not in factories:
        raise ValueError(f"from_config: unknown method {kind!r}; known: {sorted(factories)}")
    return factories[kind](config)


def parts(method: method_lib.Method, delta: Any = None) -> dict[str, Any]:
    """The parts of a :func:`jpeft.compose` (or :func:`jpeft.active`) method, rebuilt from its
    config and data: ``{name: Method}``, or ``{name: (Method, delta[name])}`` given its ``delta``
    (``{name: delta_name}``). E.g. the LoRA of a ``compose(lora=..., head=...)`` on its own::

        lora_method, lora_delta = jpeft.parts(method, delta)["lora"]

    Raises:
      ValueError: ``method`` is not a composition, or ``delta`` does not have its parts.
    """
    key = next((k for k in ("compose", "active") if k in method.config), None)
    if key is None:
        raise ValueError(f"parts: {method.name!r} is not a composition (jpeft.compose or "
                         f"jpeft.active); it has no parts")
    data = method.data or {}
    built = {n: from_config(c, data.get(n)) for n, c in method.config[key].items()}
    if delta is None:
        return built
    if not isinstance(delta, dict) or set(delta) != set(built):
        raise ValueError(f"parts: the delta's parts {sorted(delta) if isinstance(delta, dict) else type(delta).__name__} "
                         f"are not the method's {sorted(built)}")
    return {n: (m, delta[n]) for n, m in built.items()}
