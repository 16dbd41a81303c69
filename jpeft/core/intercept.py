"""Changing what selected ``flax.linen.Dense`` layers compute, without touching the model's code.

``nn.intercept_methods`` lets a function see every module method call with the bound module (and so
its path). :class:`DenseInterceptor` uses that to replace ``y = x @ W0 + b`` of chosen layers by
``edit(x, y)``: LoRA's factored form ``y + s * (x @ A) @ B`` is one such edit, and so are the other
activation-side methods. It records which layers it reached, so a target that the model never calls
through ``nn.Dense`` is reported instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from jpeft.core.paths import Path, path_str

Edit = Callable[[Any, Any], Any]   # (x [..., in], y [..., out]) -> new y [..., out]


class DenseInterceptor:
    """A linen method interceptor that edits the output of selected ``nn.Dense`` calls.

    Args:
      edits: ``{module_path: edit}`` where ``module_path`` is the path of the Dense layer's parameters
        without the leaf name, optionally with the variable collection in front
        (``("params", "encoder", ..., "query")`` or ``("encoder", ..., "query")``).
      what: name used in error messages.
    """

    def __init__(self, edits: dict[Path, Edit], what: str):
        self.edits = dict(edits)
        self.what = what
        self.reached: set[Path] = set()

    def _lookup(self, module_path: Path) -> Path | None:
        n = len(module_path)
        for key in self.edits:
            if key[len(key) - n:] == module_path and len(key) - n in (0, 1):
                return key
        return None

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        key = self._lookup(tuple(module.path))
        if key is None:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        self.reached.add(key)
        return self.edits[key](x, y)

    def check_reached(self) -> None:
        """Raises if some selected layer was never called as an ``nn.Dense``."""
        missed = [path_str(k) for k in self.edits if k not in self.reached]
        if missed:
            raise ValueError(
                f"{self.what}: {len(missed)} selected weights were never used by an nn.Dense call "
                f"in the wrapped apply function, so the factored form cannot reach them: "
                f"{missed[:5]}. Use mode='materialised' for models that do not call flax.linen.Dense.")
