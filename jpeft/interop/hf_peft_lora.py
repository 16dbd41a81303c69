"""LoRA and AdaLoRA in Hugging Face PEFT's files (the ``export`` / ``load`` pair of
:mod:`jpeft.interop.hf_peft`).

LoRA. For each adapted ``torch.nn.Linear`` named ``<m>``: ``base_model.model.<m>.lora_A.weight``
``[r_m, in]`` and ``...lora_B.weight`` ``[out, r_m]``; jpeft's factors are ``A [in, r]`` and
``B [r, out]`` for any kernel layout (the contraction's input and output axes), so
``lora_A.weight = A.T`` and ``lora_B.weight = B.T``. The output is ``W x + s_m B A x`` with
``s_m = alpha_m / r_m`` (``/ sqrt(r_m)`` with rsLoRA). Per-module ranks and alphas are PEFT's
``rank_pattern`` / ``alpha_pattern`` (regex keys matched against the end of the module name); in
jpeft they are several LoRA parts (``compose``), one per ``(rank, alpha)``.

Which modules a file adapts is what its ``target_modules``, ``exclude_modules`` and
``layers_to_transform`` / ``layers_pattern`` select among the base's 2-D kernels
(:func:`jpeft.interop.hf_files.selected_modules`); every one must have both factors in the file,
and the file must hold nothing else.

AdaLoRA (``peft_type`` ``ADALORA``): ``<m>.lora_A [r, in]`` (``P^T``), ``<m>.lora_E [r, 1]``
(``lam``), ``<m>.lora_B [out, r]`` (``Q^T``), ``r = init_r``; PEFT scales by
``lora_alpha / (r + 1e-5)``, jpeft by ``alpha / r``. A file with a ``rank_pattern`` (PEFT's
state after its budget schedule: ``{"<m>.lora_E": [bool] * init_r}``, a mask over each module's
triplets, the tensors holding only the kept ones, possibly none) is expanded back to ``init_r``
triplets with zeros in the dropped slots, which computes the same. jpeft writes all ``init_r``
triplets (its pruned ones zero) and no ``rank_pattern``.

The config keys each type reads are checked against their types (:data:`LORA_FIELDS`,
:data:`ADALORA_FIELDS`, :func:`jpeft.interop.hf_files.checked`): ``"use_rslora": "false"`` is
refused, not read as true.
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
from jpeft.methods.adalora import adalora
from jpeft.methods.lora import lora

PREFIX = "base_model.model."
#: LoRA options jpeft has no form for: (config key, the value that is refused).
UNSUPPORTED = (("use_dora", True), ("lora_bias", True), ("use_qalora", True))


# --------------------------------------------------------------------------------------------
# Export


def _factors(config: dict, delta: Any, collection: str, names=("lora_A", "lora_B")):
    """``{module: (A [in, r], B [r, out], extra)}`` of a LoRA/AdaLoRA part (2-D weights only)."""
    flat = paths_lib.flatten(delta)
    out = {}
    for p, a in flat.items():
        if p[-1] != names[0]:
            continue
        b = flat[p[:-1] + (names[1],)]
        if np.ndim(a) != 2 or np.ndim(b) != 2:
            raise ValueError(f"hf_peft.save: {paths_lib.path_str(p[:-1])} has factors of shapes "
                             f"{np.shape(a)}, {np.shape(b)}; PEFT files hold LoRA of 2-D weights "
                             f"(one torch Linear each), not stacked or multi-axis ones")
        out[hf_files.module_name(p[:-2], collection)] = (np.asarray(a), np.asarray(b), p[:-1])
    return out


def _export_lora(adapters: dict, collection: str, fan_in_fan_out: bool):
    parts = list(adapters.values())
    for config, _ in parts:
        if config.get("gate"):
            raise ValueError("hf_peft.save: a gated LoRA (UniPELT's) has no PEFT form")
    rslora = {bool(c.get("use_rslora")) for c, _ in parts}
    dropout = {float(c.get("dropout") or 0.0) for c, _ in parts}
    if len(rslora) > 1 or len(dropout) > 1:
        raise ValueError("hf_peft.save: LoRA parts with different use_rslora or dropout have no "
                         "PEFT form (one value for the whole adapter)")
    (r0, a0) = (parts[0][0]["rank"], float(parts[0][0]["alpha"]))
    tensors, modules, rank_pattern, alpha_pattern = {}, [], {}, {}
    for config, delta in parts:
        r, alpha = config["rank"], float(config["alpha"])
        for module, (a, b, _) in _factors(config, delta, collection).items():
            modules.append(module)
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.T
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b.T
            if r != r0:
                rank_pattern[module] = r
            if alpha != a0:
                alpha_pattern[module] = alpha
    fields = {"peft_type": "LORA", "r": r0, "lora_alpha": a0, "lora_dropout": dropout.pop(),
              "use_rslora": rslora.pop(), "target_modules": sorted(modules), "bias": "none",
              "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True,
              "layers_to_transform": None, "layers_pattern": None,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_dora": False,
              "lora_bias": False}
    return fields, tensors


def _export_adalora(adapters: dict, collection: str, fan_in_fan_out: bool):
    (config, delta), = adapters.values()
    if not config.get("total_steps"):
        raise ValueError("hf_peft.save: PEFT's AdaLoRA config requires total_step (> 0); build "
                         "the method with jpeft.adalora(..., total_steps=T) as it was trained")
    tensors, modules = {}, []
    flat = paths_lib.flatten(delta)
    for module, (p, q, path) in _factors(config, delta, collection).items():
        lam = np.asarray(flat[path + ("lora_E",)])
        modules.append(module)
        tensors[f"{PREFIX}{module}.lora_A"] = p.T
        tensors[f"{PREFIX}{module}.lora_E"] = lam.reshape(-1, 1)
        tensors[f"{PREFIX}{module}.lora_B"] = q.T
    fields = {"peft_type": "ADALORA", "r": config["init_r"], "init_r": config["init_r"],
              "target_r": config["target_r"], "lora_alpha": float(config["alpha"]),
              "lora_dropout": 0.0, "target_modules": sorted(modules), "bias": "none",
              "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True,
              "tinit": config["t_init"], "tfinal": config["t_final"],
              "deltaT": config["delta_t"], "beta1": config["beta1"], "beta2": config["beta2"],
              "orth_reg_weight": config["orth_reg_weight"],
              "total_step": config.get("total_steps"), "rank_pattern": None,
              "layers_to_transform": None, "layers_pattern": None, "use_dora": False}
    return fields, tensors


def export(variables: Any, adapters: dict, sites: Any = None, *, collection: str = "params",
           fan_in_fan_out: bool = False) -> tuple[dict, dict]:
    """``(fields, tensors)`` of LoRA parts (one or several ranks) or one AdaLoRA part."""
    del variables, sites
    kinds = {c["method"] for c, _ in adapters.values()}
    if kinds == {"adalora"}:
        return _export_adalora(adapters, collection, fan_in_fan_out)
    return _export_lora(adapters, collection, fan_in_fan_out)


# --------------------------------------------------------------------------------------------
# Load


#: Options of both types, checked (and some refused: :data:`UNSUPPORTED`).
_OPTIONS = {"use_dora": Field(bool, False), "lora_bias": Field(bool, False),
            "use_qalora": Field(bool, False), "bias": Field(str, "none"),
            "fan_in_fan_out": Field(bool, False)}
#: The ``adapter_config.json`` keys the LoRA reader reads (and ``hf_files.SELECTION``).
LORA_FIELDS = {"r": Field(int), "lora_alpha": Field(float), "use_rslora": Field(bool, False),
               "lora_dropout": Field(float, 0.0),
               "rank_pattern": Field(dict[Pattern, int] | None, None),
               "alpha_pattern": Field(dict[Pattern, float] | None, None), **_OPTIONS}
#: The keys the AdaLoRA reader reads; its ``rank_pattern`` is ``{"<module>.lora_E": [bool] *
#: init_r}`` (:func:`_rank_masks`).
ADALORA_FIELDS = {"init_r": Field(int), "lora_alpha": Field(float),
                  "rank_pattern": Field(dict[str, list[bool]] | None, None),
                  "target_r": Field(int, 8), "total_step": Field(int | None, None),
                  "tinit": Field(int, 0), "tfinal": Field(int, 0), "deltaT": Field(int, 1),
                  "beta1": Field(float, 0.85), "beta2": Field(float, 0.85),
                  "orth_reg_weight": Field(float, 0.5), **_OPTIONS}


def _pattern_value(pattern: dict | None, module: str, default):
    """PEFT's LoRA ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the end of
    the module name (after a ``.``; RE2, :func:`jpeft.core.paths.fullmatch`), else ``default``."""
    for key, value in (pattern or {}).items():
        if paths_lib.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def _refuse(config: dict, where) -> None:
    for key, bad in UNSUPPORTED:
        if config[key] == bad:
            raise AdapterFileError(f"{where}: {key}={bad} has no jpeft form")
    if config["bias"] != "none":
        raise AdapterFileError(f"{where}: bias={config['bias']!r} (trained biases) has no jpeft "
                               f"form in a LoRA file; train them with jpeft.bitfit instead")


def _load_lora(config, tensors, kernels, modules, where, collection):
    r, alpha = config["r"], float(config["lora_alpha"])
    groups: dict[tuple[int, float], dict] = {}
    for m in modules:
        path, d_in, d_out, dtype = kernels[m]
        rm = _pattern_value(config["rank_pattern"], m, r)
        am = float(_pattern_value(config["alpha_pattern"], m, alpha))
        a = tensors.take(f"{PREFIX}{m}.lora_A.weight", (rm, d_in), f"lora_A of {m}, r={rm}")
        b = tensors.take(f"{PREFIX}{m}.lora_B.weight", (d_out, rm), f"lora_B of {m}, r={rm}")
        group = groups.setdefault((rm, am), {})
        group[path + ("lora_A",)] = a.T.astype(dtype)
        group[path + ("lora_B",)] = b.T.astype(dtype)
    rslora, dropout = config["use_rslora"], float(config["lora_dropout"])
    parts, deltas = {}, {}
    for (rm, am), flat in sorted(groups.items()):
        targets = sorted({"/".join(p[:-2]) for p in flat})
        name = "lora" if len(groups) == 1 else f"lora_r{rm}_a{am:g}".replace(".", "_")
        parts[name] = lora(targets, rank=rm, alpha=am, use_rslora=rslora, dropout=dropout)
        deltas[name] = paths_lib.unflatten({p: jnp.asarray(x) for p, x in flat.items()})
    if len(parts) == 1:
        return next(iter(parts.values())), next(iter(deltas.values()))
    return method_lib.compose(**parts), deltas


def _rank_masks(pattern: dict | None, modules: list[str], init_r: int, where
                ) -> dict[str, np.ndarray]:
    """``{module: keep}`` (``[init_r]`` bools) of PEFT's AdaLoRA ``rank_pattern``, whose keys name
    each module's ``lora_E`` parameter: ``<module>.lora_E`` as ``save_pretrained`` writes them,
    ``<module>.lora_E.<adapter>`` as the model holds them in memory (a leading
    ``base_model.model.`` is dropped). A module it does not name keeps all ``init_r`` triplets.

    Raises:
      AdapterFileError: a key that names no ``lora_E``, or a module the file does not adapt; a
        mask of other than ``init_r`` entries.
    """
    masks = {}
    for key, keep in (pattern or {}).items():
        parts = key.split(".")
        at = len(parts) - 1 - parts[::-1].index("lora_E") if "lora_E" in parts else -1
        if at < 1 or at < len(parts) - 2:
            raise AdapterFileError(f"{where}: rank_pattern key {key!r} does not name a module's "
                                   f"lora_E (PEFT writes '<module>.lora_E')")
        module = ".".join(parts[:at])
        module = module[len(PREFIX):] if module.startswith(PREFIX) else module
        if module not in modules:
            raise AdapterFileError(f"{where}: rank_pattern key {key!r} is for module "
                                   f"{module!r}, which the file does not adapt (its "
                                   f"target_modules select {modules[:4]}...)")
        if len(keep) != init_r:
            raise AdapterFileError(f"{where}: rank_pattern[{key!r}] has {len(keep)} entries, "
                                   f"expected init_r = {init_r}")
        masks[module] = np.asarray(keep, bool)
    return masks


def _load_adalora(config, tensors, kernels, modules, where):
    init_r, alpha = config["init_r"], float(config["lora_alpha"])
    masks = _rank_masks(config["rank_pattern"], modules, init_r, where)
    flat = {}
    for m in modules:
        path, d_in, d_out, dtype = kernels[m]
        keep = masks.get(m, np.ones(init_r, bool))
        k = int(keep.sum())
        p = tensors.take(f"{PREFIX}{m}.lora_A", (k, d_in), f"P^T of {m}, {k} of init_r kept")
        e = tensors.take(f"{PREFIX}{m}.lora_E", (k, 1), f"lam of {m}, {k} of init_r kept")
        q = tensors.take(f"{PREFIX}{m}.lora_B", (d_out, k), f"Q^T of {m}, {k} of init_r kept")
        full_p = np.zeros((d_in, init_r), dtype)
        full_q = np.zeros((init_r, d_out), dtype)
        full_e = np.zeros((init_r,), dtype)
        full_p[:, keep], full_q[keep, :], full_e[keep] = p.T, q.T, e[:, 0]
        flat[path + ("lora_A",)], flat[path + ("lora_B",)] = full_p, full_q
        flat[path + ("lora_E",)] = full_e
    targets = sorted({"/".join(p[:-2]) for p in flat})
    kw = {}
    if config["total_step"]:
        kw = dict(target_r=config["target_r"], total_steps=config["total_step"],
                  t_init=config["tinit"], t_final=config["tfinal"], delta_t=config["deltaT"])
    try:
        method = adalora(targets, init_r=init_r, alpha=alpha, beta1=float(config["beta1"]),
                         beta2=float(config["beta2"]),
                         orth_reg_weight=float(config["orth_reg_weight"]), **kw)
    except ValueError as e:
        raise AdapterFileError(f"{where}: {e}") from None
    return method, paths_lib.unflatten({p: jnp.asarray(x) for p, x in flat.items()})


def load(config: dict, tensors: hf_files.Tensors, variables: Any, sites: Any = None, *,
         collection: str = "params") -> tuple[method_lib.Method, Any]:
    """The LoRA (one part per rank and alpha) or AdaLoRA method and delta of a PEFT file.

    Raises:
      AdapterFileError: a key of :data:`LORA_FIELDS` / :data:`ADALORA_FIELDS` missing or of the
        wrong type, an option jpeft has no form for, tensors that do not fit.
    """
    where = tensors.directory / hf_files.CONFIG_FILE
    adalora_file = config["peft_type"] == "ADALORA"
    config = hf_files.checked(config, ADALORA_FIELDS if adalora_file else LORA_FIELDS,
                              tensors.directory)
    _refuse(config, where)
    kernels = hf_files.linear_modules(variables, sites, collection)
    modules = hf_files.selected_modules(config, kernels, tensors.directory)
    if adalora_file:
        return _load_adalora(config, tensors, kernels, modules, where)
    return _load_lora(config, tensors, kernels, modules, where, collection)
