"""LoRA adapters to and from Hugging Face PEFT's files (``adapter_config.json`` +
``adapter_model.safetensors``).

Hugging Face PEFT stores, for each adapted ``torch.nn.Linear`` named ``<module>`` of the base model,
``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and ``...lora_B.weight`` (``[out, r]``),
and for each module in ``modules_to_save`` its full weights (``base_model.model.<module>.weight``,
``[out, in]``, and ``.bias``). A Flax kernel is ``[in, out]``, so ``A = lora_A.weight.T`` and
``B = lora_B.weight.T``. Module names are the parameter tree's module paths joined with ``.``
(the collection, ``params``, left out), which is exactly the Hugging Face name for models whose tree
mirrors Hugging Face naming, as :mod:`jpeft.models` does.

Supported: plain LoRA (``peft_type`` ``LORA``, any rank / alpha / rsLoRA / dropout, one rank for
all modules) plus ``modules_to_save``. Anything else (DoRA, per-module rank or alpha patterns,
``fan_in_fan_out``, trained LoRA biases) is refused with an error that names it.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.methods.full import full_finetune
from jpeft.methods.lora import lora
from jpeft.models.loading import flax_to_hf_state, hf_state_to_flax

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def _parts(method: method_lib.Method) -> dict[str, dict]:
    parts = method.config.get("compose", {"lora": method.config})
    for name, cfg in parts.items():
        if cfg.get("method") not in ("lora", "full"):
            raise ValueError(f"save_lora: part {name!r} is {cfg.get('method')!r}; only LoRA and "
                             f"fully trained modules (modules_to_save) have a Hugging Face form")
    if sum(cfg["method"] == "lora" for cfg in parts.values()) != 1:
        raise ValueError("save_lora: the method must contain exactly one LoRA part")
    return parts


def _module_name(path: paths_lib.Path, collection: str) -> str:
    module = path[1:] if path[:1] == (collection,) else path
    return ".".join(module)


def save_lora(directory: str | os.PathLike, variables: Any, method: method_lib.Method, delta: Any,
              *, base_model_name_or_path: str | None = None, collection: str = "params",
              overwrite: bool = False) -> Path:
    """Write ``delta`` as a Hugging Face PEFT LoRA adapter directory (atomically).

    Args:
      directory: the adapter directory to create.
      variables: the base model's variables (``{"params": ...}``); fully trained parts
        (``jpeft.full_finetune``, e.g. a task head) are written merged, as ``modules_to_save``.
      method: a ``jpeft.lora`` method, or a ``compose`` of one LoRA part and ``full_finetune`` parts.
      delta: its delta.
      base_model_name_or_path: recorded in ``adapter_config.json``.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists (pass overwrite=True to replace it)")
    parts = _parts(method)
    composed = "compose" in method.config
    tensors: dict[str, np.ndarray] = {}
    lora_cfg, modules, save_modules = None, [], []
    for name, cfg in parts.items():
        part = delta[name] if composed else delta
        if cfg["method"] == "lora":
            lora_cfg = cfg
            flat = paths_lib.flatten(part)
            for p in flat:
                if p[-1] != "lora_A":
                    continue
                module = _module_name(p[:-2], collection)
                shapes = (np.shape(flat[p]), np.shape(flat[p[:-1] + ("lora_B",)]))
                if len(shapes[0]) != 2 or len(shapes[1]) != 2:
                    raise ValueError(
                        f"save_lora: {paths_lib.path_str(p[:-1])} has factors of shapes {shapes}; "
                        f"Hugging Face PEFT files hold LoRA of 2-D weights [in, out] only")
                modules.append(module)
                tensors[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(
                    np.asarray(flat[p]).T)
                tensors[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(
                    np.asarray(flat[p[:-1] + ("lora_B",)]).T)
        else:
            merged = full_finetune().merge(variables, {n: part[n] for n in part})
            touched = {p[:-1] for p in paths_lib.flatten(part)}
            sub = paths_lib.unflatten({p[1:] if p[:1] == (collection,) else p: x
                                       for p, x in paths_lib.flatten(merged).items()
                                       if p[:-1] in touched})
            for key, x in flax_to_hf_state(sub).items():
                tensors[PREFIX + key] = x
            save_modules += sorted({_module_name(p, collection) for p in touched})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": lora_cfg["rank"], "lora_alpha": lora_cfg["alpha"], "lora_dropout": lora_cfg["dropout"],
        "use_rslora": lora_cfg["use_rslora"], "target_modules": sorted(modules),
        "modules_to_save": save_modules or None, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "inference_mode": True,
        "revision": None,
    }
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _refuse_unsupported(config: dict) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_lora: peft_type is {config.get('peft_type')!r}, only 'LORA' is read")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True), ("lora_bias", True)):
        if config.get(key) == bad:
            raise ValueError(f"load_lora: {key}={bad} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"load_lora: per-module {key} {config[key]} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"load_lora: bias={config['bias']!r} (trained biases) is not supported")


def load_lora(directory: str | os.PathLike, variables: Any, *, collection: str = "params"
              ) -> tuple[method_lib.Method, Any]:
    """Read a Hugging Face PEFT LoRA adapter directory for the base model ``variables``.

    Returns:
      ``(method, delta)``: a ``jpeft.lora`` method (or ``compose(lora=..., head=full_finetune(...))``
      when the file has ``modules_to_save``) and its delta, ready for ``jpeft.wrap``/``merge``.

    Raises:
      ValueError: unsupported adapter types/options, a module that the base model does not have
        (listing the closest existing ones), or a tensor whose shape does not fit.
    """
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    _refuse_unsupported(config)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    flat_vars = paths_lib.flatten(variables)
    kernels = {_module_name(p[:-1], collection): p for p in flat_vars if p[-1] == "kernel"}
    rank = int(config["r"])

    lora_delta, modules, head_state = {}, [], {}
    for key, value in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for which in ("lora_A", "lora_B"):
            suffix = f".{which}.weight"
            if name.endswith(suffix):
                module = name[:-len(suffix)]
                if module not in kernels:
                    close = difflib.get_close_matches(module, list(kernels), n=5, cutoff=0.0)
                    raise ValueError(f"load_lora: {key} adapts {module!r}, which the base model does "
                                     f"not have; closest modules: {close}")
                path = kernels[module]
                d_in, d_out = flat_vars[path].shape
                want = (rank, d_in) if which == "lora_A" else (d_out, rank)
                if tuple(value.shape) != want:
                    raise ValueError(f"load_lora: {key} has shape {tuple(value.shape)}, expected "
                                     f"{want} for the kernel {paths_lib.path_str(path)} "
                                     f"{(d_in, d_out)} at r={rank}")
                lora_delta[path + (which,)] = jnp.asarray(value.T, flat_vars[path].dtype)
                if which == "lora_A":
                    modules.append(module)
                break
        else:
            head_state[name] = value
    if not modules:
        raise ValueError(f"load_lora: {directory / WEIGHTS_FILE} holds no lora_A/lora_B tensors")

    lora_method = lora([m.replace(".", "/") for m in modules], rank=rank,
                       alpha=float(config["lora_alpha"]), use_rslora=bool(config.get("use_rslora")),
                       dropout=float(config.get("lora_dropout") or 0.0))
    lora_tree = paths_lib.unflatten(lora_delta)
    if not head_state:
        return lora_method, lora_tree

    base = variables[collection]
    loaded, report = hf_state_to_flax(head_state, base, base_model_prefix="")
    if report.unexpected:
        raise ValueError(f"load_lora: tensors that match no module of the base model: "
                         f"{list(report.unexpected)}")
    flat_loaded, flat_base = paths_lib.flatten(loaded), paths_lib.flatten(base)
    changed = [p for p in flat_loaded if p not in {tuple(m.split("/")) for m in report.missing}]
    head_modules = sorted({"/".join(p[:-1]) for p in changed})
    head_delta = paths_lib.unflatten({(collection,) + p: flat_loaded[p] - flat_base[p]
                                      for p in changed})
    method = method_lib.compose(lora=lora_method, head=full_finetune(head_modules, name="head"))
    return method, {"lora": lora_tree, "head": head_delta}
