"""Adapters to and from Hugging Face PEFT's files (``adapter_config.json`` +
``adapter_model.safetensors``): LoRA, AdaLoRA, IA3, prompt tuning and prefix tuning.

``save(directory, variables, method, delta, sites=...)`` writes what ``peft.PeftModel.
from_pretrained`` reads; ``load(directory, variables, sites=...)`` returns ``(method, delta)``
for ``jpeft.wrap`` / ``merge``. The method is one adapter part (``jpeft.lora``, ``jpeft.adalora``,
``jpeft.ia3``, ``prompt_tuning``, ``prefix_tuning``; several LoRA parts with different ranks or
alphas become ``rank_pattern`` / ``alpha_pattern``), optionally composed with fully trained
modules (``jpeft.full_finetune``, e.g. a task head), which PEFT calls ``modules_to_save`` and
stores merged.

Module names are the parameter tree's module paths joined with ``.`` (the collection, ``params``,
left out): the Hugging Face names for models whose tree mirrors Hugging Face naming, as
:mod:`jpeft.models` does. A Flax kernel ``[in, out]`` is a torch ``Linear`` weight ``[out, in]``;
the LoRA factors are stored as PEFT stores them (``lora_A.weight [r, in]``, ``lora_B.weight
[out, r]``) whatever the kernel's layout, and ``fan_in_fan_out`` records whether the torch
weight is ``[in, out]`` (GPT-2's ``Conv1D``): pass ``fan_in_fan_out=True`` for such models.

Only what PEFT's torch model computes alike is written: a BERT classifier that pools otherwise
than torch's ``BertForSequenceClassification`` (always ``tanh(W h[:, 0] + b)``, its pooler; jpeft's
``pooling="mean"`` has no pooler) is refused (:func:`check_same_function`), as its adapter
would give other predictions in torch; ``allow_function_change=True`` writes it anyway.

Loading is all or nothing: a file that does not fit (a factor missing, a tensor no reader knows,
a shape that does not fit the base, a module the base lacks, a required config key missing, a
config value of the wrong type (:func:`jpeft.interop.hf_files.checked`), an option jpeft has no
form for) raises one :class:`AdapterFileError` (a ``ValueError``) naming the key, before anything
is returned.

Each adapter type lives in its own module with an ``export`` / ``load`` pair (the contract below);
this module dispatches on ``method.config["method"]`` when saving and on ``peft_type`` when loading.

* ``export(variables, adapters, sites, *, collection, fan_in_fan_out) -> (fields, tensors)``:
  ``adapters`` is ``{part: (config, delta)}`` of the adapter parts (several only for LoRA of
  different ranks); ``fields`` the ``adapter_config.json`` entries of the type (``peft_type``
  included), ``tensors`` its safetensors entries by full key.
* ``load(config, tensors, variables, sites, *, collection) -> (method, delta)``: ``config`` the
  parsed JSON (its :data:`~jpeft.interop.hf_files.COMMON` keys checked; the type checks the keys
  it reads with :func:`~jpeft.interop.hf_files.checked`), ``tensors`` a
  :class:`jpeft.interop.hf_files.Tensors` from which the type takes every tensor it reads
  (leftovers are refused afterwards).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping

from jpeft.core import method as method_lib
from jpeft.interop import hf_files
from jpeft.interop.hf_files import AdapterFileError

#: ``method.config["method"]`` -> module with the type's ``export`` / ``load``.
BY_METHOD = {"lora": "jpeft.interop.hf_peft_lora", "adalora": "jpeft.interop.hf_peft_lora",
             "ia3": "jpeft.interop.hf_peft_ia3", "prompt": "jpeft.interop.hf_peft_prompt",
             "prefix": "jpeft.interop.hf_peft_prompt"}
#: ``peft_type`` -> module.
BY_PEFT_TYPE = {"LORA": "jpeft.interop.hf_peft_lora", "ADALORA": "jpeft.interop.hf_peft_lora",
                "IA3": "jpeft.interop.hf_peft_ia3",
                "PROMPT_TUNING": "jpeft.interop.hf_peft_prompt",
                "PREFIX_TUNING": "jpeft.interop.hf_peft_prompt"}
#: Prompt learning wraps the base model directly: its modules_to_save keys start ``base_model.``;
#: the tuner types (LoRA, AdaLoRA, IA3) wrap it once more.
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING")
TUNER_PREFIX, PROMPT_PREFIX = "base_model.model.", "base_model."


def _split(method: method_lib.Method, delta: Any) -> tuple[dict[str, tuple[dict, Any]],
                                                          dict[str, tuple[dict, Any]]]:
    """``(adapters, heads)``: ``{part: (config, delta)}`` of the adapter parts and of the fully
    trained parts."""
    if "compose" in method.config:
        parts = {n: (c, delta[n]) for n, c in method.config["compose"].items()}
    else:
        parts = {method.name: (method.config, delta)}
    adapters, heads = {}, {}
    for name, (config, part) in parts.items():
        kind = config.get("method")
        if kind == "full":
            heads[name] = (config, part)
        elif kind in BY_METHOD:
            adapters[name] = (config, part)
        else:
            raise ValueError(f"hf_peft.save: part {name!r} is {kind!r}, which has no Hugging Face "
                             f"PEFT form (known: {sorted(BY_METHOD)} and full_finetune parts as "
                             f"modules_to_save)")
    kinds = {c["method"] for c, _ in adapters.values()}
    if len(kinds) != 1 or (len(adapters) > 1 and kinds != {"lora"}):
        raise ValueError(f"hf_peft.save: a PEFT file holds one adapter type; the method has "
                         f"{sorted(kinds) or 'none'} in parts {sorted(adapters)} (several parts "
                         f"only for LoRA of different ranks)")
    return adapters, heads


def check_same_function(variables: Any, model: dict | None, collection: str = "params") -> None:
    """Refuse a base whose torch counterpart computes another function: a BERT classifier (a
    ``bert`` encoder and a ``classifier``) that does not pool through BERT's pooler, known from
    its ``model`` record (``pooling`` other than ``"cls"``, :func:`jpeft.models.loading.
    model_record`) or from its parameters (no ``bert/pooler``: mean pooling). Torch's
    ``BertForSequenceClassification`` always pools ``tanh(W h[:, 0] + b)``.

    Raises:
      ValueError: naming the pooling, why torch's predictions would differ, and the ways out.
    """
    params = variables.get(collection, {}) if isinstance(variables, Mapping) else {}
    classifier = (isinstance(params, Mapping) and "classifier" in params and "bert" in params
                  and isinstance(params["bert"], Mapping))
    if model is not None and model.get("loader") == "load_hf_bert" and model.get("with_head"):
        other = model.get("pooling") != "cls"
        pooling = f"pooling={model.get('pooling')!r}"
    else:
        other = classifier and "pooler" not in params["bert"]
        pooling = "pooling='mean' (its parameters have no bert/pooler)"
    if other:
        raise ValueError(
            f"hf_peft.save: this BERT classifier was trained with {pooling}; torch's "
            f"BertForSequenceClassification, which PEFT loads the adapter onto, always pools "
            f"tanh(W h[:, 0] + b) through its pooler, so the exported adapter would give other "
            f"logits and labels. Train the classifier with pooling='cls' (load_hf_bert(..., "
            f"pooling='cls')) to export it, or keep it in jpeft's format (jpeft.save); pass "
            f"allow_function_change=True only to write it anyway, knowing that torch's "
            f"predictions will differ from jpeft's")


def save(directory: str | os.PathLike, variables: Any, method: method_lib.Method, delta: Any, *,
         sites: Any = None, base_model_name_or_path: str | None = None,
         task_type: str | None = None, fan_in_fan_out: bool = False, collection: str = "params",
         model: dict | None = None, allow_function_change: bool = False,
         overwrite: bool = False) -> Path:
    """Write ``method``'s ``delta`` as a Hugging Face PEFT adapter directory (atomically).

    Args:
      directory: the adapter directory to create.
      variables: the base model's variables (``{"params": ...}``); fully trained parts are written
        merged into them, as ``modules_to_save``.
      method, delta: see the module docstring for the methods that have a PEFT form.
      sites: the model's sites (:func:`jpeft.probe`): needed for prompt and prefix tuning and for
        weights not stored ``[in, out]``.
      base_model_name_or_path, task_type: recorded in ``adapter_config.json``.
      fan_in_fan_out: the torch model stores these weights ``[in, out]`` (LoRA, IA3).
      model: the base's model record (:func:`jpeft.models.loading.model_record`), checked by
        :func:`check_same_function` (without it, the parameters are).
      allow_function_change: write an adapter whose torch model computes another function than
        jpeft's (a mean-pooled BERT classifier): torch's predictions then differ.

    Raises:
      ValueError: a method without a PEFT form, naming the part; a base whose torch counterpart
        computes another function (:func:`check_same_function`) without
        ``allow_function_change``.
      FileExistsError: ``directory`` exists and ``overwrite`` is false.
    """
    if not allow_function_change:
        check_same_function(variables, model, collection)
    adapters, heads = _split(method, delta)
    kind = next(iter(adapters.values()))[0]["method"]
    module = importlib.import_module(BY_METHOD[kind])
    fields, tensors = module.export(variables, adapters, sites, collection=collection,
                                    fan_in_fan_out=fan_in_fan_out)
    prefix = PROMPT_PREFIX if fields["peft_type"] in PROMPT_LEARNING else TUNER_PREFIX
    saved: list[str] = []
    for _, (_, head) in heads.items():
        head_tensors, names = hf_files.saved_modules(variables, head, prefix, collection)
        tensors.update(head_tensors)
        saved += names
    config = {"peft_type": fields["peft_type"], "task_type": task_type,
              "base_model_name_or_path": base_model_name_or_path, "revision": None,
              "inference_mode": True, **fields, "modules_to_save": sorted(saved) or None}
    return hf_files.write(directory, config, tensors, overwrite=overwrite)


def load(directory: str | os.PathLike, variables: Any, *, sites: Any = None,
         collection: str = "params") -> tuple[method_lib.Method, Any]:
    """Read a Hugging Face PEFT adapter directory for the base model ``variables``.

    ``sites`` (:func:`jpeft.probe`) are needed for prompt and prefix tuning and for weights not
    stored ``[in, out]``.

    Returns:
      ``(method, delta)``: the adapter's method (``compose(<adapter>=..., head=full_finetune(...))``
      when the file has ``modules_to_save``) and its delta.

    Raises:
      FileNotFoundError: a missing directory or file.
      AdapterFileError: anything that does not fit (module docstring), naming it.
    """
    directory = Path(directory)
    config, raw = hf_files.read(directory)
    config = hf_files.checked(config, hf_files.COMMON, directory)
    peft_type = config["peft_type"]
    if peft_type not in BY_PEFT_TYPE:
        raise AdapterFileError(f"{directory / hf_files.CONFIG_FILE}: peft_type {peft_type!r} has "
                               f"no jpeft reader (known: {sorted(BY_PEFT_TYPE)})")
    tensors = hf_files.Tensors(raw, directory)
    module = importlib.import_module(BY_PEFT_TYPE[peft_type])
    adapter, adapter_delta = module.load(config, tensors, variables, sites, collection=collection)
    prefix = PROMPT_PREFIX if peft_type in PROMPT_LEARNING else TUNER_PREFIX
    head, head_delta = hf_files.load_saved_modules(tensors, variables,
                                                   config["modules_to_save"] or (), prefix,
                                                   collection)
    tensors.finish()
    if head is None:
        return adapter, adapter_delta
    name = "lora" if "compose" in adapter.config else adapter.config["method"]
    return (method_lib.compose(**{name: adapter, "head": head}),
            {name: adapter_delta, "head": head_delta})
