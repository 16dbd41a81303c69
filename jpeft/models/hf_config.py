"""What every reference-model config shares: built from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping


class HFConfig:
    """Mixin for frozen config dataclasses named as in a Hugging Face ``config.json``.

    A subclass's ``from_dict`` normalises the model-specific keys, then calls :meth:`_build`.
    """

    @classmethod
    def _build(cls, d: Mapping[str, Any], overrides: Mapping[str, Any]):
        """The config from ``d`` updated with ``overrides``; keys that are not fields are ignored."""
        d = {**d, **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any):
        """Config from a Hugging Face ``config.json`` file (see ``from_dict``)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **overrides)
