"""Prompt tuning and prefix tuning in Hugging Face PEFT's files (the ``export`` / ``load`` pair of
:mod:`jpeft.interop.hf_peft`).

Both store one tensor, ``prompt_embeddings``:

* prompt tuning (``PROMPT_TUNING``): the soft prompt ``P: [l, d]`` (``l = num_virtual_tokens``,
  ``d = token_dim``, the word-embedding width), jpeft's ``delta["prompt"]``;
* prefix tuning (``PREFIX_TUNING``): every layer's key and value prefixes, ``[l, n * 2 * K * D]``
  for ``n = num_layers`` attentions with ``K = num_attention_heads`` key/value heads of size ``D``
  (``token_dim = K * D``; PEFT counts key/value heads, so a grouped-query model has ``K < N``).
  Row ``t`` is ``[P_k^1[t], P_v^1[t], ..., P_k^n[t], P_v^n[t]]``, each ``[K, D]`` flattened
  (layer-major, key before value: PEFT views it ``[l, n * 2, K, D]``). jpeft's direct prefix
  delta holds ``prefix_keys``, ``prefix_values`` ``[*L, l, K, D]`` at each attention's scope.

  PEFT's reparametrised prefix (``prefix_projection: true``) saves the MLP's output, the prefixes
  themselves (``get_prompt_embedding_to_save``), so such a file loads as the direct form too; a
  reparametrised jpeft prefix is written after :func:`jpeft.methods.prefix.fold`.

``num_transformer_submodules`` (2 for encoder-decoder models) must be 1. Prompt learning files
wrap the base model once, so their ``modules_to_save`` keys start ``base_model.`` (the dispatcher's
business).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sites as sites_lib
from jpeft.interop import hf_files
from jpeft.core.schema import Field
from jpeft.interop.hf_files import AdapterFileError
from jpeft.methods import prefix as prefix_lib
from jpeft.methods import prompt as prompt_lib

KEY = "prompt_embeddings"
KEYS, VALUES = "prefix_keys", "prefix_values"
#: The ``adapter_config.json`` keys each type reads, checked (:func:`hf_files.checked`).
FIELDS = {
    "PROMPT_TUNING": {"num_virtual_tokens": Field(int), "token_dim": Field(int),
                      "num_transformer_submodules": Field(int | None, None)},
    "PREFIX_TUNING": {"num_virtual_tokens": Field(int), "token_dim": Field(int),
                      "num_layers": Field(int), "num_attention_heads": Field(int),
                      "num_transformer_submodules": Field(int | None, None)},
}


def _need_sites(sites: Any, what: str) -> None:
    if sites is None:
        raise ValueError(f"hf_peft: {what} needs the model's sites: pass sites=jpeft.probe("
                         f"apply_fn, variables, *example_inputs)")


def _attentions(sites: Any) -> list[prefix_lib.Attention]:
    """Every attention of the model with prefix hook points, in forward order; ``[]`` when the
    model marks no attention ``context``."""
    if sites is None or not any(m.kind == "context" for m in sites.marks.values()):
        return []
    return prefix_lib.attentions(sites)


def _kv_shape(atts: list[prefix_lib.Attention]) -> tuple[int, int, int]:
    """``(n, K, D)``: the number of attention layers (stacked ones counted per layer) and the one
    key/value head count and size they share.

    Raises:
      ValueError: attentions of different key/value shapes (PEFT's layout has one ``K, D``).
    """
    shapes = sorted({(a.kv_heads, a.head_dim) for a in atts})
    if len(shapes) != 1:
        raise ValueError(f"hf_peft: the attentions have key/value shapes {shapes}; PEFT's prefix "
                         f"layout needs one")
    (k, d), = shapes
    return sum(a.layers for a in atts), k, d


# --------------------------------------------------------------------------------------------
# Prefix layout


def prefix_rows(delta: Any, atts: list[prefix_lib.Attention], l: int) -> np.ndarray:
    """jpeft's direct prefixes ``{scope: {prefix_keys, prefix_values: [*L, l, K, D]}}`` as PEFT's
    ``[l, n * 2 * K * D]`` (per row: each layer's key then value, ``[K, D]`` flattened)."""
    flat = paths_lib.flatten(delta)
    blocks = []
    for a in atts:
        k, v = (np.asarray(flat[a.scope + (leaf,)]).reshape(a.layers, l, -1)
                for leaf in (KEYS, VALUES))
        blocks.append(np.stack([k, v], axis=1))                       # [layers, 2, l, K D]
    both = np.concatenate(blocks, axis=0)                             # [n, 2, l, K D]
    return np.ascontiguousarray(np.moveaxis(both, 2, 0).reshape(l, -1))


def prefix_delta(rows: np.ndarray, atts: list[prefix_lib.Attention], l: int, dtype) -> Any:
    """The inverse of :func:`prefix_rows`: ``[l, n * 2 * K * D]`` -> ``{scope: {prefix_keys,
    prefix_values: [*L, l, K, D]}}``."""
    n, k, d = _kv_shape(atts)
    h = np.moveaxis(rows.reshape(l, n, 2, k, d), 0, 2)                # [n, 2, l, K, D]
    flat, start = {}, 0
    for a in atts:
        block = h[start:start + a.layers].reshape(a.scanned + (2, l, k, d))
        flat[a.scope + (KEYS,)] = jnp.asarray(block[..., 0, :, :, :].astype(dtype))
        flat[a.scope + (VALUES,)] = jnp.asarray(block[..., 1, :, :, :].astype(dtype))
        start += a.layers
    return paths_lib.unflatten(flat)


# --------------------------------------------------------------------------------------------
# Export


def _export_prompt(config: dict, delta: Any, sites: Any) -> tuple[dict, dict]:
    prompt = np.asarray(delta["prompt"])                              # [l, d]
    atts = _attentions(sites)
    fields = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": config["num_virtual_tokens"],
              "token_dim": int(prompt.shape[-1]), "num_transformer_submodules": 1,
              "num_attention_heads": atts[0].heads if atts else None,
              "num_layers": sum(a.layers for a in atts) if atts else None,
              "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None,
              "tokenizer_name_or_path": None, "tokenizer_kwargs": None}
    return fields, {KEY: prompt}


def _export_prefix(config: dict, delta: Any, sites: Any) -> tuple[dict, dict]:
    if config.get("reparametrize"):
        raise ValueError("hf_peft.save: a reparametrised prefix (embedding + MLP) is saved as its "
                         "prefixes: fold it first with jpeft.methods.prefix.fold(method, delta, "
                         "sites) and save jpeft.methods.prefix.folded(method) with that delta")
    if config.get("gate"):
        raise ValueError("hf_peft.save: a gated prefix (UniPELT's) has no PEFT form")
    if not config.get("shift_positions", True):
        raise ValueError("hf_peft.save: PEFT's prefix always shifts the tokens' positions by l; a "
                         "prefix with shift_positions=False has no PEFT form")
    _need_sites(sites, "prefix tuning")
    t = lambda v: tuple(v) if isinstance(v, list) else v
    atts = prefix_lib.attentions(sites, t(config.get("targets")),
                                 exclude=t(config.get("exclude") or ()), what=config["name"])
    every = [a.scope for a in prefix_lib.attentions(sites)]
    if [a.scope for a in atts] != every:
        raise ValueError(f"hf_peft.save: PEFT's prefix reaches every attention layer; this one "
                         f"reaches {len(atts)} of {len(every)}")
    l = config["num_virtual_tokens"]
    n, k, d = _kv_shape(atts)
    fields = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": l, "token_dim": k * d,
              "num_transformer_submodules": 1, "num_attention_heads": k, "num_layers": n,
              "encoder_hidden_size": k * d, "prefix_projection": False}
    return fields, {KEY: prefix_rows(delta, atts, l)}


def export(variables: Any, adapters: dict, sites: Any = None, *, collection: str = "params",
           fan_in_fan_out: bool = False) -> tuple[dict, dict]:
    """``(fields, {"prompt_embeddings": ...})`` of one prompt or (direct) prefix tuning part.

    Raises:
      ValueError: a prefix that is reparametrised (fold it first), gated, without position shift
        or on a subset of the attentions; prefix tuning without ``sites``.
    """
    del variables, collection, fan_in_fan_out
    (config, delta), = adapters.values()
    if config["method"] == "prompt":
        return _export_prompt(config, delta, sites)
    return _export_prefix(config, delta, sites)


# --------------------------------------------------------------------------------------------
# Load


def _check(config: dict, key: str, want: int, directory, why: str) -> None:
    """``config[key]`` (checked: :data:`FIELDS`) must be ``want``."""
    got = config[key]
    if got != want:
        raise AdapterFileError(f"{directory / hf_files.CONFIG_FILE}: {key} is {got!r} but the base "
                               f"model has {want} ({why}): a file for another model?")


def _submodules(config: dict, directory) -> None:
    n = config["num_transformer_submodules"]
    if n not in (None, 1):
        raise AdapterFileError(f"{directory / hf_files.CONFIG_FILE}: num_transformer_submodules="
                               f"{n!r} (an encoder-decoder model's); jpeft reads 1")


def _virtual_tokens(config: dict, directory) -> int:
    l = config["num_virtual_tokens"]
    if l < 1:
        raise AdapterFileError(f"{directory / hf_files.CONFIG_FILE}: num_virtual_tokens={l!r} is "
                               f"not a positive int")
    return l


def _load_prompt(config, tensors, sites, directory):
    _need_sites(sites, "prompt tuning")
    l = _virtual_tokens(config, directory)
    try:
        found = sites_lib.select_marks(sites, prompt_lib.EMBEDDINGS, "out", what="prompt tuning")
    except ValueError as e:
        raise AdapterFileError(f"{tensors.where}: the base model has no word embeddings to put "
                               f"the prompt in ({e})") from None
    if len(found) != 1:
        raise AdapterFileError(f"{tensors.where}: the base model has {len(found)} word-embedding "
                               f"modules ({[paths_lib.path_str(m.scope) for m in found]}); "
                               f"jpeft's prompt tuning needs one")
    width, dtype = found[0].shape[-1], found[0].dtype
    _check(config, "token_dim", width, directory, "its word-embedding width")
    prompt = tensors.take(KEY, (l, width), "the soft prompt [num_virtual_tokens, token_dim]")
    return prompt_lib.prompt_tuning(l), {"prompt": jnp.asarray(prompt.astype(dtype))}


def _load_prefix(config, tensors, sites, directory):
    _need_sites(sites, "prefix tuning")
    l = _virtual_tokens(config, directory)
    atts = prefix_lib.attentions(sites)
    n, k, d = _kv_shape(atts)
    _check(config, "num_layers", n, directory, "attention layers")
    _check(config, "num_attention_heads", k, directory, "key/value heads")
    _check(config, "token_dim", k * d, directory, "key/value heads x head size")
    rows = tensors.take(KEY, (l, n * 2 * k * d),
                        "the prefixes [num_virtual_tokens, num_layers * 2 * token_dim]")
    method = prefix_lib.prefix_tuning(l)
    return method, prefix_delta(rows, atts, l, method.config["dtype"])


def load(config: dict, tensors: hf_files.Tensors, variables: Any, sites: Any = None, *,
         collection: str = "params") -> tuple[method_lib.Method, Any]:
    """``prompt_tuning(l)`` and ``{"prompt": [l, d]}``, or the direct ``prefix_tuning(l)`` on every
    attention and its prefixes, from a PEFT file; checked against the base model's sites.

    Raises:
      ValueError: no ``sites``.
      AdapterFileError: a required key missing or of the wrong type; ``num_layers``, ``num_attention_heads`` or
        ``token_dim`` not those of the base; ``num_transformer_submodules`` not 1; a missing or
        misshapen ``prompt_embeddings``.
    """
    del variables, collection
    directory = tensors.where.parent
    config = hf_files.checked(config, FIELDS[config["peft_type"]], directory)
    _submodules(config, directory)
    if config["peft_type"] == "PROMPT_TUNING":
        return _load_prompt(config, tensors, sites, directory)
    return _load_prefix(config, tensors, sites, directory)
