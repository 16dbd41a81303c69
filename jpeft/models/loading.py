"""Hugging Face state dicts <-> Flax parameter trees, and loading a BERT checkpoint directory.

The name mapping is generic: a Hugging Face key ``a.b.c.<leaf>`` names the module path
``(a, b, c)``, and the Flax leaf is chosen by what that module holds in the *target* tree (never by
guessing from the name):

================  ==========================  ===================================
HF leaf           Flax module holds           Flax leaf
================  ==========================  ===================================
``weight``        ``kernel`` (``nn.Dense``)   ``kernel = weight.T`` (``[in, out]``)
``weight``        ``embedding`` (``nn.Embed``)  ``embedding = weight``
``weight/gamma``  ``scale`` (``nn.LayerNorm``)  ``scale = weight``
``bias/beta``     ``bias``                    ``bias = bias``
================  ==========================  ===================================

Buffers that are not parameters (``embeddings.position_ids``, ``embeddings.token_type_ids``) are
skipped. A checkpoint of a bare encoder (keys ``embeddings...``) loads into a model with a head
(params ``bert/embeddings/...``) and vice versa, the way ``transformers`` handles its
``base_model_prefix``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze
from safetensors.numpy import load_file

from jpeft.models.bert import BertConfig, BertForSequenceClassification, BertModel

Path = tuple[str, ...]

IGNORED_BUFFERS = ("position_ids", "token_type_ids")
"""Last components of Hugging Face state-dict keys that are buffers, not parameters."""


class LoadReport(NamedTuple):
    """What :func:`hf_state_to_flax` did.

    ``missing``: Flax paths (``"/"``-joined) left at their initial value; ``unexpected``: checkpoint
    keys that match no parameter; ``ignored``: checkpoint buffers skipped on purpose.
    """

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x))


def _flax_leaf(hf_leaf: str, leaves: set[str]) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
    """The Flax leaf a Hugging Face leaf loads into, given the leaves of the target module."""
    if hf_leaf == "weight":
        if "kernel" in leaves:
            return "kernel", _transpose
        for name in ("embedding", "scale"):
            if name in leaves:
                return name, _identity
    elif hf_leaf == "gamma" and "scale" in leaves:
        return "scale", _identity
    elif hf_leaf in ("bias", "beta") and "bias" in leaves:
        return "bias", _identity
    return None


def _candidates(module: Path, prefix: str, add: bool, strip: bool) -> list[Path]:
    out = [module]
    if add:
        out.insert(0, (prefix,) + module)
    if strip and module[:1] == (prefix,):
        out.insert(0, module[1:])
    return out


def hf_state_to_flax(state: Mapping[str, Any], target_params: Any, *, base_model_prefix: str = "bert",
                     strict: bool = False) -> tuple[dict, LoadReport]:
    """Overwrite the leaves of ``target_params`` with the tensors of a Hugging Face state dict.

    Args:
      state: ``{key: array}`` as in a ``model.safetensors`` file or ``{k: v.numpy()}`` of a torch
        ``state_dict()``.
      target_params: the Flax parameter tree (the ``'params'`` collection) to fill; it fixes the
        structure, the shapes and the dtypes of the result.
      base_model_prefix: the name of the encoder inside a model with a head (``"bert"``); added to
        checkpoint keys when the target has it and the checkpoint does not, stripped in the
        opposite case.
      strict: raise a ``ValueError`` if any parameter is missing or any key unexpected.

    Returns:
      ``(params, report)``: a new tree (cast to the target dtypes; missing leaves are the target's)
      and a :class:`LoadReport`.

    Raises:
      ValueError: on any shape mismatch (naming the key, the file's shape and the expected shape),
        on two keys loading into the same parameter, and, with ``strict``, on missing/unexpected.
    """
    flat: dict[Path, Any] = traverse_util.flatten_dict(unfreeze(target_params))
    modules: dict[Path, set[str]] = {}
    for path in flat:
        modules.setdefault(path[:-1], set()).add(path[-1])
    top = {path[0] for path in flat}
    prefixed = any(k.startswith(base_model_prefix + ".") for k in state)
    add = base_model_prefix in top and not prefixed
    strip = base_model_prefix not in top and prefixed

    new = dict(flat)
    source: dict[Path, str] = {}
    unexpected, ignored = [], []
    for key, value in state.items():
        *module, hf_leaf = key.split(".")
        if hf_leaf in IGNORED_BUFFERS:
            ignored.append(key)
            continue
        match = None
        for cand in _candidates(tuple(module), base_model_prefix, add, strip):
            match = _flax_leaf(hf_leaf, modules.get(cand, set()))
            if match is not None:
                break
        if match is None:
            unexpected.append(key)
            continue
        leaf, convert = match
        path = cand + (leaf,)
        target = flat[path]
        value = np.asarray(value)
        expected = tuple(target.shape)[::-1] if leaf == "kernel" else tuple(target.shape)
        if value.shape != expected:
            raise ValueError(
                f"shape mismatch for {key!r} (-> {'/'.join(path)}): the checkpoint has "
                f"{tuple(value.shape)}, the model expects {expected}"
                + (f" (Flax kernel {tuple(target.shape)} = weight.T)" if leaf == "kernel" else ""))
        if path in source:
            raise ValueError(f"{key!r} and {source[path]!r} both load into {'/'.join(path)}")
        source[path] = key
        new[path] = jnp.asarray(convert(value), dtype=target.dtype)

    missing = tuple("/".join(p) for p in flat if p not in source)
    report = LoadReport(missing, tuple(unexpected), tuple(ignored))
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"strict loading failed: missing {list(report.missing)}, "
                         f"unexpected {list(report.unexpected)}")
    return traverse_util.unflatten_dict(new), report


def flax_to_hf_state(params: Any) -> dict[str, np.ndarray]:
    """The inverse of :func:`hf_state_to_flax`: ``{hf_key: np.ndarray}`` for every leaf.

    ``kernel -> weight.T``, ``embedding -> weight``, ``scale -> weight``, ``bias -> bias``; module
    paths are joined with ``"."``. The arrays are C-contiguous (ready for ``safetensors``).
    """
    out = {}
    for path, x in traverse_util.flatten_dict(unfreeze(params)).items():
        *module, leaf = (str(p) for p in path)
        x = np.asarray(x)
        if leaf == "kernel":
            if x.ndim != 2:
                raise ValueError(f"{'/'.join(path)}: only 2-D kernels map to a Linear weight, got {x.shape}")
            name, x = "weight", _transpose(x)
        elif leaf in ("embedding", "scale"):
            name = "weight"
        elif leaf == "bias":
            name = "bias"
        else:
            raise ValueError(f"{'/'.join(path)}: no Hugging Face name for leaf {leaf!r}")
        key = ".".join(module + [name])
        if key in out:
            raise ValueError(f"two parameters map to {key!r}")
        out[key] = np.ascontiguousarray(x)
    return out


class LoadedBert(NamedTuple):
    """What :func:`load_hf_bert` returns: the config, the module and its ``'params'`` tree;
    ``record`` is the model record to save with a delta trained on it (:func:`model_record`)."""

    config: BertConfig
    model: nn.Module
    params: dict
    report: LoadReport

    @property
    def record(self) -> dict:
        """:func:`model_record` of ``model``: pass it to ``jpeft.save(..., model=)`` and
        ``jpeft.load(..., model=)``."""
        return model_record(self.model)


# --------------------------------------------------------------------------------------------
# Model records: the choices that change the function a delta was trained on


#: Config fields that do not change the function of a loaded model (dropout acts in training
#: only; the initialiser's scale, ``scan_layers``' layout, ``remat`` and the ``attention``
#: kernel leave the computed values alone; BERT's ``pad_token_id`` is read by nothing), left
#: out of the record.
NOT_RECORDED = {"BertConfig": ("hidden_dropout_prob", "attention_probs_dropout_prob",
                               "classifier_dropout", "initializer_range", "pad_token_id"),
                "LlamaConfig": ("initializer_range", "scan_layers", "remat", "attention")}
#: Fields of a BERT classifier's head, left out of the record of a :class:`BertModel`.
HEAD_FIELDS = ("num_labels",)


def model_record(model: Any) -> dict:
    """What a delta trained on ``model`` depends on beyond the shapes of its weights, as a flat
    JSON object: ``loader`` (the function that builds such a base), every config field that
    changes the function (a BERT's ``pooling``, ``num_labels``, ``hidden_size``, layers, vocab,
    activation, epsilon, ...; not those of :data:`NOT_RECORDED`), ``with_head`` for a BERT, and
    the computation ``dtype`` and ``param_dtype``. Save it with the delta
    (``jpeft.save(..., model=)``); ``jpeft.load(..., model=)`` refuses a base whose record
    differs.

    ``model``: a :class:`BertForSequenceClassification` or :class:`BertModel` (linen), or a
    :class:`jpeft.models.llama.LlamaForCausalLM` (NNX); any module with ``config`` (a dataclass),
    ``dtype`` and ``param_dtype`` otherwise (``loader`` then its class name).

    Raises:
      TypeError: a model without a dataclass ``config``.
    """
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"model_record: {type(model).__name__} has no dataclass config; expected "
                        f"a jpeft.models BERT or LLaMA module")
    skip = set(NOT_RECORDED.get(type(config).__name__, ()))
    record: dict[str, Any] = {}
    if isinstance(model, (BertForSequenceClassification, BertModel)):
        with_head = isinstance(model, BertForSequenceClassification)
        record.update(loader="load_hf_bert", with_head=with_head)
        skip |= set() if with_head else set(HEAD_FIELDS)
    else:
        record["loader"] = ("load_hf_llama" if type(config).__name__ == "LlamaConfig"
                            else type(model).__name__)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name not in skip:
            record[field.name] = value if isinstance(value, (str, int, float, bool, type(None))) \
                else repr(value)
    record["dtype"] = _dtype_name(getattr(model, "dtype", None))
    record["param_dtype"] = _dtype_name(getattr(model, "param_dtype", None))
    return record


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else jnp.dtype(dtype).name


def rebuild_hint(record: dict, keys: Any) -> str:
    """The call that builds the base ``record`` describes, with the values of ``keys`` (those
    that differed), e.g. ``load_hf_bert(model_dir, pooling='mean', num_labels=2)``."""
    keys = [k for k in keys if k in record and k != "loader"]
    dtypes = {"dtype", "param_dtype"}
    shown = lambda k: f"jnp.{record[k]}" if k in dtypes and record[k] else repr(record[k])
    loader = record.get("loader")
    if loader == "load_hf_bert":
        args = ", ".join(f"{k}={shown(k)}" for k in keys)
        return f"jpeft.models.load_hf_bert(model_dir, {args})"
    if loader == "load_hf_llama":
        fields = ", ".join(f"{k}={shown(k)}" for k in keys if k not in dtypes)
        config = f"config=dataclasses.replace(config, {fields})" if fields else "config=config"
        rest = "".join(f", {k}={shown(k)}" for k in keys if k in dtypes)
        return f"jpeft.models.load_hf_llama(source, {config}{rest})"
    return f"a {loader} with " + ", ".join(f"{k}={shown(k)}" for k in keys)


def load_hf_bert(model_dir: str | os.PathLike, *, num_labels: int | None = None,
                 pooling: str | None = "cls", with_head: bool = True, rng: jax.Array | None = None,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, strict: bool = False,
                 **config_overrides: Any) -> LoadedBert:
    """Build a BERT from a Hugging Face directory (``config.json`` + ``model.safetensors``).

    The model (:class:`BertForSequenceClassification` if ``with_head`` else :class:`BertModel`) is
    initialised with ``rng`` (default ``jax.random.key(0)``) and every parameter found in the file
    overwrites its initial value; the rest (e.g. ``pooler`` and ``classifier`` for a
    sentence-transformers checkpoint) stays at init and is listed in ``report.missing``.

    ``num_labels=None`` keeps the file's value (``num_labels`` or ``len(id2label)``, else 2);
    ``config_overrides`` are further :class:`BertConfig` fields.

    ``pooling``, the head, ``num_labels``, the config and the dtypes change the function a delta
    is trained on without changing the shapes of what it adapts: save the result's ``record``
    (:func:`model_record`) with the delta (``jpeft.save(..., model=loaded.record)``) and pass it
    to ``jpeft.load(..., model=)``, which refuses a base built otherwise.
    """
    model_dir = pathlib.Path(model_dir)
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no model.safetensors in {model_dir}")
    overrides = dict(config_overrides, pooling=pooling)
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    config = BertConfig.from_json_file(model_dir / "config.json", **overrides)
    cls = BertForSequenceClassification if with_head else BertModel
    model = cls(config, dtype=dtype, param_dtype=param_dtype)
    rng = jax.random.key(0) if rng is None else rng
    init = jax.jit(model.init)(rng, jnp.zeros((1, 1), jnp.int32))["params"]

    params, report = hf_state_to_flax(load_file(str(weights)), init, strict=strict)
    return LoadedBert(config, model, params, report)
