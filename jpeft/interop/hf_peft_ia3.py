"""IA3 in Hugging Face PEFT's files (the ``export`` / ``load`` pair of
:mod:`jpeft.interop.hf_peft`).

For each rescaled ``torch.nn.Linear`` named ``<m>`` (``y = W x + b``, ``W: [out, in]``) the file
holds ``base_model.model.<m>.ia3_l``:

* an ordinary target, ``y <- l * (W x + b)``: ``ia3_l`` is ``[out, 1]``;
* a feed-forward target (``feedforward_modules``), ``y <- W (l * x) + b``: ``ia3_l`` is ``[1, in]``.

jpeft's :func:`jpeft.methods.ia3.ia3` holds the same vector ``l`` as ``[out]`` (``[in]``) at
``<kernel path>/ia3_l``, whatever the kernel's layout, so the file's tensor is ``l`` reshaped.
The shapes follow the module's input and output widths, not its weight layout, so
``fan_in_fan_out`` (GPT-2's ``Conv1D`` stores ``W`` as ``[in, out]``) changes nothing in them: it is
written as given and accepted either way when loading.

Which modules a file rescales is what its ``target_modules`` (list: the module name or a suffix of
it after a ``.``; string: a full regex match) and ``exclude_modules`` select among the base's 2-D
dot-contraction weights (one torch ``Linear`` each); which of them are feed-forward is PEFT's rule
on ``feedforward_modules`` (list: the module name *ends with* an entry, no ``.`` required;
string: a full regex match). Every selected module must have its vector in the file and every
vector must belong to a selected module. ``init_ia3_weights`` only says how PEFT initialised the
vectors; the file's values are what is loaded.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.interop import hf_files
from jpeft.core.schema import Field, Pattern
from jpeft.interop.hf_files import AdapterFileError
from jpeft.methods import ia3 as ia3_lib

PREFIX = "base_model.model."
LEAF = ia3_lib.LEAF                      # "ia3_l", in jpeft's delta and in PEFT's keys
#: The ``adapter_config.json`` keys the reader reads (and ``hf_files.SELECTION``), checked.
FIELDS = {"feedforward_modules": Field(Pattern | list[str]),
          "fan_in_fan_out": Field(bool, False), "init_ia3_weights": Field(bool, True)}


# --------------------------------------------------------------------------------------------
# Export


def _vectors(config: dict, delta: Any, collection: str) -> dict[str, tuple[np.ndarray, bool]]:
    """``{module name: (l, feedforward)}`` of an IA3 delta; ``l`` is 1-D (``[out]`` or ``[in]``).

    Raises:
      ValueError: a vector of more than one axis (a layer-stacked or multi-axis kernel: no single
        torch ``Linear``).
    """
    feedforward = config.get("feedforward") or ()
    feedforward = tuple(feedforward) if isinstance(feedforward, list) else feedforward
    out = {}
    for path, l in paths_lib.flatten(delta).items():
        if path[-1] != LEAF:
            continue
        if np.ndim(l) != 1:
            raise ValueError(f"hf_peft.save: {paths_lib.path_str(path)} has shape {np.shape(l)}; "
                             f"PEFT files hold IA3 of 2-D weights (one torch Linear each), not "
                             f"layer-stacked or multi-axis ones")
        kernel = path[:-1]
        out[hf_files.module_name(kernel[:-1], collection)] = (
            np.asarray(l), paths_lib.matches(kernel[:-1], feedforward))
    return out


def export(variables: Any, adapters: dict, sites: Any = None, *, collection: str = "params",
           fan_in_fan_out: bool = False) -> tuple[dict, dict]:
    """``(fields, tensors)`` of one IA3 part: ``ia3_l`` ``[out, 1]`` per ordinary module and
    ``[1, in]`` per feed-forward one; ``target_modules`` / ``feedforward_modules`` list the full
    module names (exact in PEFT's matching)."""
    del variables, sites
    (config, delta), = adapters.values()
    vectors = _vectors(config, delta, collection)
    tensors = {f"{PREFIX}{m}.{LEAF}": (l.reshape(1, -1) if ff else l.reshape(-1, 1))
               for m, (l, ff) in vectors.items()}
    fields = {"peft_type": "IA3", "target_modules": sorted(vectors),
              "feedforward_modules": sorted(m for m, (_, ff) in vectors.items() if ff),
              "exclude_modules": None, "fan_in_fan_out": fan_in_fan_out,
              "init_ia3_weights": True}
    return fields, tensors


# --------------------------------------------------------------------------------------------
# Load


def _feedforward(spec: str | list[str], name: str) -> bool:
    """PEFT's ``feedforward_modules`` match: a full regex match for a string (RE2,
    :func:`jpeft.core.paths.fullmatch`); for a list, the name ends with an entry (plain string
    suffix, as ``IA3Model._check_target_module_feedforward``)."""
    if isinstance(spec, str):
        return paths_lib.fullmatch(spec, name)
    return any(name.endswith(t) for t in spec)


def _refuse_strays(tensors: hf_files.Tensors, linears: dict, chosen: list[str]) -> None:
    """An ``ia3_l`` tensor for a module the base lacks, or one ``target_modules`` leaves out, is an
    error naming its key (rather than a leftover)."""
    for key in tensors.keys():
        if not (key.startswith(PREFIX) and key.endswith("." + LEAF)):
            continue
        module = key[len(PREFIX):-len(LEAF) - 1]
        if module not in linears:
            raise AdapterFileError(f"{tensors.where}: {key} is for module {module!r}, which the "
                                   f"base model lacks (or which is not a 2-D linear weight there)")
        if module not in chosen:
            raise AdapterFileError(f"{tensors.where}: {key} is for module {module!r}, which the "
                                   f"file's target_modules / exclude_modules do not select")


def load(config: dict, tensors: hf_files.Tensors, variables: Any, sites: Any = None, *,
         collection: str = "params") -> tuple[method_lib.Method, Any]:
    """The IA3 method (targets: the file's modules, by exact path) and its delta ``{kernel path +
    ("ia3_l",): l}``, ``l`` of the kernel's dtype."""
    directory = tensors.where.parent
    config = hf_files.checked(config, FIELDS, directory)
    linears = hf_files.linear_modules(variables, sites, collection)
    chosen = hf_files.selected_modules(config, linears, directory)
    feedforward = config["feedforward_modules"]
    _refuse_strays(tensors, linears, chosen)
    flat, targets, ff_targets = {}, [], []
    for m in chosen:
        path, d_in, d_out, dtype = linears[m]
        ff = _feedforward(feedforward, m)
        shape, what = ((1, d_in), f"feed-forward IA3 vector of {m}: [1, in]") if ff else (
            (d_out, 1), f"IA3 vector of {m}: [out, 1]")
        l = tensors.take(f"{PREFIX}{m}.{LEAF}", shape, what)
        flat[path + (LEAF,)] = jnp.asarray(l.reshape(-1).astype(dtype))
        targets.append("/".join(path[:-1]))
        if ff:
            ff_targets.append("/".join(path[:-1]))
    method = ia3_lib.ia3(tuple(targets), tuple(ff_targets))
    return method, paths_lib.unflatten(flat)
