"""Fixed-length tokenisation with a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library).

Every batch has the same shape ``[N, max_length]``, so a jitted model compiles once.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer


def load_tokenizer(path: str | os.PathLike, max_length: int = 128) -> Tokenizer:
    """A tokenizer from ``tokenizer.json`` that truncates and right-pads to exactly ``max_length``.

    Whatever padding/truncation the file sets is replaced; the pad token, its id and its type id
    are kept from the file when it has padding settings, else ``[PAD]`` (its id in the vocabulary).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    tok = Tokenizer.from_file(os.fspath(path))
    pad = tok.padding or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = pad.get("pad_id", tok.token_to_id(pad_token))
    if pad_id is None:
        raise ValueError(f"{path}: no padding settings and no {pad_token!r} token in the vocabulary")
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(direction="right", pad_id=pad_id, pad_type_id=pad.get("pad_type_id", 0),
                       pad_token=pad_token, length=max_length)
    return tok


def encode(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """``{input_ids, attention_mask, token_type_ids}``, each an int32 array ``[N, max_length]``.

    ``attention_mask`` is 1 on real tokens and 0 on padding.
    """
    if isinstance(texts, str):
        raise TypeError("encode expects a sequence of strings, not a single string")
    encodings = tokenizer.encode_batch(list(texts))
    width = (tokenizer.padding or {}).get("length") or 0
    as_array = lambda field: np.asarray([getattr(e, field) for e in encodings],
                                        dtype=np.int32).reshape(len(encodings), -1 if encodings else width)
    return {"input_ids": as_array("ids"), "attention_mask": as_array("attention_mask"),
            "token_type_ids": as_array("type_ids")}
