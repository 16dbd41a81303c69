"""The recipes' ``--quantize`` option: the frozen base stored int8 or NF4 (QLoRA), the delta trained
on top (:mod:`jpeft.quantized`).

One mechanism for every recipe: the model is loaded (or trained) in full precision, then
:func:`prepare` stores its linear weights quantized (:func:`jpeft.quantize_params` with the model's
own sites, the all-linear rule: not embeddings, not the output head), wraps its apply function with
:func:`jpeft.dequantizing` and probes the wrapped model again; everything downstream (methods,
training, evaluation) runs on what it returns. ``"none"`` returns the model as it is.

A saved result records :func:`config` (the scheme and the settings :func:`quantize` used) so that
a reload rebuilds the same base: :func:`check_recorded` turns a mismatch into an error instead of
a delta silently running on other weights than it was trained with.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

from jpeft import quantized
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib
from jpeft.core import tree as tree_lib

#: The ``--quantize`` choices: ``"none"`` (the base as loaded) or a :data:`jpeft.quantized.SCHEMES`
#: scheme.
CHOICES = ("none",) + tuple(quantized.SCHEMES)

#: The settings :func:`quantize` uses for each scheme (:func:`jpeft.quantize_params`' defaults,
#: written out so that a checkpoint records them).
SETTINGS = {"nf4": {"targets": "all-linear", "block_size": 64, "double_quant": True},
            "int8": {"targets": "all-linear"}}


def check(scheme: str) -> str:
    """``scheme`` if it is one of :data:`CHOICES`; a ``ValueError`` naming them otherwise."""
    if scheme not in CHOICES:
        raise ValueError(f"quantize: scheme must be one of {', '.join(CHOICES)}; got {scheme!r}")
    return scheme


def config(scheme: str) -> dict[str, Any]:
    """What a saved result records about its base: ``{"quantize": scheme}`` plus, for a quantized
    base, the settings of :data:`SETTINGS` (JSON)."""
    return {"quantize": check(scheme), **SETTINGS.get(scheme, {})}


def quantize(params: Any, sites: sites_lib.Sites, scheme: str) -> Any:
    """``params`` with its linear weights stored as ``scheme`` (:func:`jpeft.quantize_params` with
    :data:`SETTINGS`); ``"none"`` returns ``params`` itself. Deterministic: the same weights give
    the same stored arrays, bit for bit (a reload quantizes again and must find the trained-on
    base)."""
    if check(scheme) == "none":
        return params
    return quantized.quantize_params(params, sites, scheme=scheme, **SETTINGS[scheme])


class Base(NamedTuple):
    """The frozen base a recipe trains on: ``apply(params, *inputs)``, its ``params``, the
    ``sites`` probed on that apply function, and the ``scheme`` it is stored in."""
    apply: Callable[..., Any]
    params: Any
    sites: sites_lib.Sites
    scheme: str

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Another function of the same parameters (e.g. a generation loop) made to run on this
        base: :func:`jpeft.dequantizing` for a quantized one, ``fn`` itself otherwise."""
        return fn if self.scheme == "none" else quantized.dequantizing(fn)


def prepare(apply: Callable[..., Any], params: Any, sites: sites_lib.Sites, args: tuple,
            scheme: str, **kwargs: Any) -> Base:
    """The model ``apply(params, *args, **kwargs)`` (``sites`` its :func:`jpeft.probe`) on a base
    stored as ``scheme``: :func:`quantize`, the apply function wrapped with
    :func:`jpeft.dequantizing` and probed again on ``args`` (example inputs). ``"none"``: the model
    unchanged.

    Raises:
      ValueError: an unknown scheme; a ``params`` tree that already holds quantized weights.
    """
    if check(scheme) == "none":
        return Base(apply, params, sites, "none")
    held = quantized_paths(params)
    if held:
        raise ValueError(f"quantize: the base already holds {len(held)} quantized weights (e.g. "
                         f"{paths_lib.path_str(held[0])}); quantize a full-precision base, or "
                         f"pass 'none' to use it as it is")
    qparams = quantize(params, sites, scheme)
    qapply = quantized.dequantizing(apply)
    return Base(qapply, qparams, sites_lib.probe(qapply, qparams, *args, **kwargs), scheme)


def quantized_paths(params: Any) -> list[paths_lib.Path]:
    """The paths of the quantized weights (:class:`jpeft.QuantizedArray`) in ``params``."""
    return [p for p, x in paths_lib.flatten(params).items() if paths_lib.is_array_node(x)]


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _full_bytes(x: Any) -> int:
    return math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize


class Bytes(NamedTuple):
    """Stored bytes of a base: ``stored`` (:func:`jpeft.num_bytes`), ``full`` (every weight in
    its own dtype, as :func:`jpeft.dequantize_params` gives it), and the ``weights`` quantized,
    their bytes stored (``weights_stored``) and in full precision (``weights_full``)."""
    stored: int
    full: int
    weights: int
    weights_stored: int
    weights_full: int

    def line(self, scheme: str) -> str:
        """One log line: the bytes with and without quantization, and the ratios."""
        if scheme == "none":
            return f"base stored in full precision: {_size(self.stored)} (no --quantize)"
        return (f"base stored {scheme}: its {self.weights} linear weights take "
                f"{_size(self.weights_stored)} instead of {_size(self.weights_full)} "
                f"({self.weights_full / self.weights_stored:.2f}x smaller); the whole base "
                f"{_size(self.stored)} instead of {_size(self.full)} "
                f"({self.full / self.stored:.2f}x: the other weights, embeddings, norms, "
                f"biases, the output head, stay in full precision)")


def num_bytes(params: Any) -> Bytes:
    """The :class:`Bytes` of ``params`` (works on abstract arrays too)."""
    flat = paths_lib.flatten(params)
    held = [x for x in flat.values() if paths_lib.is_array_node(x)]
    return Bytes(tree_lib.num_bytes(params), sum(_full_bytes(x) for x in flat.values()),
                 len(held), sum(x.nbytes for x in held), sum(_full_bytes(x) for x in held))


def check_recorded(recorded: dict[str, Any] | None, scheme: str, where: Any) -> None:
    """Raise unless the base quantization ``recorded`` with a saved result (its :func:`config`;
    ``None``: a result saved before the recipes recorded it, whose base was in full precision)
    is the one of the base it is about to run on, stored as ``scheme``.

    Raises:
      ValueError: the two differ, naming both and the option that rebuilds the recorded base.
    """
    got = {"quantize": "none"} if recorded is None else dict(recorded)
    want = config(scheme)
    if got != want:
        raise ValueError(
            f"{where} was trained on a base quantized as {got}, but the base it would now run on "
            f"is {want}: its delta would act on other weights than it was trained with. Rebuild "
            f"the base as recorded (--quantize {got.get('quantize')!s})")
