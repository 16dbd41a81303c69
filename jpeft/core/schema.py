"""Configs read from files, checked against declared types: one clear error per problem, naming
the file, the key, the value and the type expected.

A *schema* is ``{key: Field(type, default)}``. Types are Python annotations read as the JSON forms
a config holds:

* ``int``: a JSON integer (``true``/``false`` are not integers); ``float``: a JSON number (an
  integer or a float, not a bool); ``bool``: ``true`` or ``false`` only (``"false"`` is refused,
  never read as true); ``str``; ``None``: ``null``; ``Any`` (or no annotation): any value;
* :data:`Pattern`: a string that is a regular expression RE2 compiles
  (:func:`jpeft.core.paths.compile_pattern`);
* ``X | Y``: either; ``Sequence[X]``, ``list[X]``, ``tuple[X, ...]``: a JSON array of ``X``;
  ``tuple[X, Y]``: an array of two, ``X`` then ``Y``; ``Mapping[K, V]``, ``dict[K, V]``: a JSON
  object (its keys strings, checked as ``K`` when ``K`` is ``str`` or :data:`Pattern`), bare
  ``dict``: any object; a ``NamedTuple`` class: an object with exactly its fields, each of its
  type; a ``Callable``: nothing a file can hold.

:func:`check` returns the config with every optional key that is missing (or ``null`` where
``null`` is not a value of its type) set to its default.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any, NamedTuple, NewType

#: A string that must compile as an RE2 regular expression.
Pattern = NewType("Pattern", str)
#: The default of a required field.
REQUIRED = object()


class Field(NamedTuple):
    """A config key's type, and its default (:data:`REQUIRED`: the key must be present)."""
    type: Any
    default: Any = REQUIRED


def _args(hint) -> tuple:
    return typing.get_args(hint)


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_namedtuple(hint) -> bool:
    return isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields")


def conforms(value: Any, hint: Any) -> bool:
    """Whether the JSON value ``value`` is of the type ``hint`` (module docstring)."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    if hint is Pattern:
        if not isinstance(value, str):
            return False
        from jpeft.core import paths
        try:
            paths.compile_pattern(value)
        except ValueError:
            return False
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if _is_union(hint):
        return any(conforms(value, h) for h in _args(hint))
    if _is_namedtuple(hint):
        fields = typing.get_type_hints(hint)
        return (isinstance(value, dict) and set(value) == set(hint._fields)
                and all(conforms(value[k], fields.get(k, Any)) for k in hint._fields))
    origin = typing.get_origin(hint) or hint
    if origin is dict or origin is collections.abc.Mapping:
        if not isinstance(value, dict):
            return False
        args = _args(hint) or (Any, Any)
        key_hint = args[0] if args[0] in (str, Pattern) else str
        return all(conforms(k, key_hint) and conforms(v, args[1]) for k, v in value.items())
    if origin is tuple and _args(hint) and _args(hint)[-1] is not Ellipsis:
        return (isinstance(value, list) and len(value) == len(_args(hint))
                and all(conforms(v, h) for v, h in zip(value, _args(hint))))
    if origin in (list, tuple, collections.abc.Sequence):
        item = _args(hint)[0] if _args(hint) else Any
        return isinstance(value, list) and all(conforms(v, item) for v in value)
    if origin is collections.abc.Callable:
        return False
    raise TypeError(f"schema: no JSON form for the annotation {hint!r}")


_NOUNS = {bool: "bool", int: "int", float: "number", str: "str", Pattern: "regular expression"}


def _noun(hint: Any) -> str:
    """``hint`` as an item or key type: ``int``, ``str``, ... (no article)."""
    return _NOUNS.get(hint) or describe(hint)


def describe(hint: Any) -> str:
    """``hint`` in words, as the error messages name the expected type."""
    if hint is Any:
        return "any value"
    if hint is None or hint is type(None):
        return "null"
    if hint is Pattern:
        return "a regular expression (str, RE2 syntax)"
    if hint in (bool, int, float, str):
        return {bool: "a bool (true or false)", int: "an int", float: "a number",
                str: "a str"}[hint]
    if _is_union(hint):
        parts = [describe(h) for h in _args(hint)
                 if typing.get_origin(h) is not collections.abc.Callable]
        return " or ".join(dict.fromkeys(parts))
    if _is_namedtuple(hint):
        return f"an object with keys {list(hint._fields)}"
    origin = typing.get_origin(hint) or hint
    if origin is dict or origin is collections.abc.Mapping:
        args = _args(hint)
        return "an object" + (f" {{{_noun(args[0])}: {_noun(args[1])}}}" if args else "")
    if origin is tuple and _args(hint) and _args(hint)[-1] is not Ellipsis:
        return f"a list [{', '.join(_noun(h) for h in _args(hint))}]"
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_noun(_args(hint)[0])}" if _args(hint) else "a list"
    return repr(hint)


def shown(value: Any, limit: int = 120) -> str:
    """``repr(value)`` with its JSON type, cut to ``limit`` characters."""
    text = repr(value)
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    kind = {dict: "object", list: "list", type(None): "null"}.get(type(value),
                                                                 type(value).__name__)
    return f"{text} ({kind})"


def check(config: Any, fields: dict[str, Field], where: str, error: type[Exception] = ValueError,
          *, refuse_unknown: bool = False, key_prefix: str = "") -> dict:
    """``config`` checked against ``fields``, with the defaults of missing optional keys filled in.

    Args:
      config: the parsed JSON.
      fields: the schema.
      where: names the file (and the part of it) in the messages.
      error: the exception class raised.
      refuse_unknown: a key not in ``fields`` is an error (a config jpeft wrote, which holds
        exactly its fields); otherwise it is left as it is (another tool's keys).
      key_prefix: prepended to key names in messages (a nested config: ``"compose.lora."``).

    Raises:
      error: ``config`` is not a JSON object; a required key is missing; a value is not of its
        key's type; an unknown key (with ``refuse_unknown``). The first problem found.
    """
    if not isinstance(config, dict):
        raise error(f"{where}: the config{f' {key_prefix[:-1]!r}' if key_prefix else ''} is "
                    f"{shown(config)}; expected a JSON object")
    out = dict(config)
    for key, field in fields.items():
        value = config.get(key)
        if key not in config or (value is None and field.default is not REQUIRED
                                 and not conforms(None, field.type)):
            if field.default is REQUIRED:
                raise error(f"{where}: required key {key_prefix + key!r} is missing (expected "
                            f"{describe(field.type)})")
            out[key] = field.default
            continue
        if value is None and field.default is REQUIRED and not conforms(None, field.type):
            raise error(f"{where}: required key {key_prefix + key!r} is missing (null; expected "
                        f"{describe(field.type)})")
        if not conforms(value, field.type):
            raise error(f"{where}: key {key_prefix + key!r} is {shown(value)}; expected "
                        f"{describe(field.type)}{_pattern_note(value, field.type)}")
    if refuse_unknown:
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise error(f"{where}: unknown keys {[key_prefix + k for k in unknown]} (the config "
                        f"holds {sorted(fields)}): written by another version of jpeft, or edited?")
    return out


def _pattern_note(value: Any, hint: Any) -> str:
    """Why a string was refused where a :data:`Pattern` may stand: RE2's own message."""
    if not isinstance(value, str) or not _mentions_pattern(hint):
        return ""
    from jpeft.core import paths
    try:
        paths.compile_pattern(value)
    except ValueError as e:
        return f" ({e})"
    return ""


def _mentions_pattern(hint: Any) -> bool:
    return hint is Pattern or any(_mentions_pattern(h) for h in _args(hint))
