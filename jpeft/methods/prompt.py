"""Prompt tuning (Lester et al., 2021): ``l`` learned soft tokens prepended to the input embeddings.

The model runs on ``l + T`` positions: the inputs are lengthened by ``l`` placeholder tokens in
front (the token ids by ``pad_id``, the attention mask by ones so every token sees the prompt, the
token types by zeros), and at the output of the word-embedding lookup (the embedding module's
``"out"`` mark, :mod:`jpeft.core.marks`) the placeholders' embeddings are replaced by the prompt
``P: [l, d]``. Everything after the lookup is the model's own: positions count the prompt first
(absolute positions ``0 .. l + T - 1`` in BERT; in the LLaMA decoder, positions from the mask),
as Hugging Face PEFT's prompt tuning does. Outputs keep the longer sequence (``[B, l + T, ...]``);
pooled outputs (a classifier) see the prompt too, as in PEFT.

``inputs`` says which arguments of the model's apply are ``[B, T]`` sequences and what to
prepend: ``{position or keyword: fill value}`` with the default for jpeft's models and Hugging
Face signatures (``input_ids, attention_mask, token_type_ids``). An argument absent from a call
is left out (a model that defaults its mask to ones then gets ones for the prompt too).

With a KV cache (``jpeft.models.llama.generate`` wrapped), the prompt goes in with the prefill;
a later call of at most ``l`` tokens is a decoding step and keeps the model's own embeddings.

Initialisation: ``N(0, 1)`` (PEFT's ``RANDOM``), or from text (PEFT's ``TEXT``): the word
embeddings of ``init_token_ids`` (repeated to ``l``). Trainable count: ``l * d``. Prompt tuning
changes activations: it cannot be merged.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import precision
from jpeft.core import sharding as sharding_lib
from jpeft.core import sites as sites_lib

#: The word-embedding module (Hugging Face naming: BERT ``word_embeddings``, LLaMA
#: ``embed_tokens``).
EMBEDDINGS = r".*(word_embeddings|embed_tokens)"
#: ``input_ids``, ``attention_mask``, ``token_type_ids`` by position and by name: what to prepend.
INPUTS = {0: 0, 1: 1, 2: 0, "input_ids": 0, "attention_mask": 1, "token_type_ids": 0}


def _table(params: Any, scope: tuple) -> tuple | None:
    """Path of the embedding table of the module at ``scope`` (its one 2-D leaf)."""
    flat = paths_lib.flatten(params)
    for module in (scope, ("params",) + scope):
        leaves = [p for p, v in flat.items() if p[:-1] == module and np.ndim(v) == 2]
        if len(leaves) == 1:
            return leaves[0]
    return None


def prompt_tuning(num_virtual_tokens: int = 20, embeddings: paths_lib.Targets = EMBEDDINGS, *,
                  init_token_ids: Sequence[int] | None = None, pad_id: int = 0,
                  inputs: Mapping[int | str, int] | None = None,
                  name: str = "prompt") -> method_lib.Method:
    """Prompt tuning with ``l = num_virtual_tokens`` soft tokens.

    Args:
      embeddings: the word-embedding module (targets over mark scopes; must select exactly one).
      init_token_ids: initialise the prompt from the embeddings of these tokens (repeated or cut
        to ``l``); default random ``N(0, 1)``. The prompt is stored in the embeddings' dtype,
        float32 where that is of lower precision (:func:`jpeft.core.precision.delta_dtype`).
      pad_id: the placeholder token id (its embedding is replaced; any valid id works).
      inputs: ``{argument position or keyword: value to prepend}`` (default :data:`INPUTS`).

    Raises:
      ValueError: ``l < 1``; (at ``init``/in the forward pass) no or several embedding modules, an
        input that is not ``[B, T]``, or a lengthened sequence the model cannot hold.
    """
    if not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"{name}: num_virtual_tokens must be a positive int, got "
                         f"{num_virtual_tokens!r}")
    l = num_virtual_tokens
    spec = dict(INPUTS if inputs is None else inputs)
    pad = {k: (pad_id if v == 0 and k in (0, "input_ids") else v) for k, v in spec.items()}

    def site(sites):
        found = sites_lib.select_marks(sites, embeddings, "out", what=name)
        if len(found) != 1:
            raise ValueError(f"{name}: the embedding targets select {len(found)} modules "
                             f"({[paths_lib.path_str(m.scope) for m in found]}); name one")
        return found[0]

    def init(key, params, sites=None):
        m = site(sites)
        d = m.shape[-1]
        if init_token_ids is None:
            return {"prompt": jax.random.normal(key, (l, d), precision.delta_dtype(m.dtype))}
        table = _table(params, m.scope)
        if table is None:
            raise ValueError(f"{name}: cannot find the embedding table of "
                             f"{paths_lib.path_str(m.scope)} to initialise from text")
        ids = np.resize(np.asarray(init_token_ids, np.int32), l)
        return {"prompt": jnp.asarray(paths_lib.flatten(params)[table])[ids].astype(
            precision.delta_dtype(m.dtype))}

    def lengthen(x, fill, what):
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"{name}: input {what!r} should be [B, T] to prepend the prompt, got "
                             f"shape {x.shape}")
        return jnp.concatenate([jnp.full((x.shape[0], l), fill, x.dtype), x], axis=1)

    def change_inputs(args, kwargs):
        args = tuple(lengthen(a, pad[i], i) if i in pad and a is not None else a
                     for i, a in enumerate(args))
        kwargs = {k: (lengthen(v, pad[k], k) if k in pad and v is not None else v)
                  for k, v in kwargs.items()}
        return args, kwargs

    def edits(params, delta, sites, context):
        m = site(sites)

        def fn(call, arrays):
            v = call.value                                          # [B, l + T, d]
            if v.shape[1] <= l:         # a decoding step after the prompt is in the KV cache
                return v
            p = jnp.broadcast_to(arrays["prompt"].astype(v.dtype), (v.shape[0], l, v.shape[-1]))
            return jnp.concatenate([p, v[:, l:]], axis=1)
        return sites_lib.Edits(params, {}, {m.key: sites_lib.MarkEdit(
            {"prompt": delta["prompt"]}, fn)}, change_inputs)


    config = {"method": "prompt", "num_virtual_tokens": l,
              "embeddings": list(embeddings) if isinstance(embeddings, tuple) else embeddings,
              "init_token_ids": None if init_token_ids is None else [int(i) for i in
                                                                      init_token_ids],
              "pad_id": pad_id, "inputs": None if inputs is None else
              [[k, v] for k, v in spec.items()], "name": name}
    return method_lib.Method(
        name=name, init=init, merge=None, unmerge=None, edits=edits,
        shardings=sharding_lib.replicated,
        labels=method_lib.constant_labels(name), config=config)


def from_config(config: dict) -> method_lib.Method:
    """The prompt tuning method a saved ``config`` describes."""
    c = dict(config)
    if c.pop("method", None) != "prompt":
        raise ValueError(f"prompt.from_config: not a prompt tuning config: {config!r}")
    if isinstance(c.get("embeddings"), list):
        c["embeddings"] = tuple(c["embeddings"])
    if c.get("inputs") is not None:
        c["inputs"] = {k: v for k, v in c["inputs"]}
    return prompt_tuning(**c)
