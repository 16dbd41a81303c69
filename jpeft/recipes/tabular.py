"""Text data from CSV and JSON Lines files: the command line's ``--data``.

A file is ``.csv`` (a header row, then one row per example; UTF-8, a byte-order mark allowed) or
``.jsonl`` (one JSON object per line; blank lines skipped). :func:`columns` reads the header only
(the first row of a CSV, the keys of the first object of a JSONL file), so that the command line
checks ``--text-column`` / ``--label-column`` before anything loads. :func:`read` reads the whole
file: texts, raw labels, and the line of each row (for errors).

Labels are class names or integers. :class:`LabelMap` maps them to ids ``0..K-1`` (integers,
or strings that spell integers such as a CSV's ``"0"``/``"1"``, in numeric order; anything else
as strings in sorted order) and is saved with a run (``labels.json``), so that predictions are
given back as the labels of the file and an evaluation file may spell ``1`` where the training
file had ``"1"``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

#: File suffix -> format.
FORMATS = {".csv": "csv", ".jsonl": "jsonl"}


class DataError(ValueError):
    """A data file that cannot be used as asked (one line naming the file and, where there is
    one, the line)."""


def file_format(path: str | os.PathLike) -> str:
    """``"csv"`` or ``"jsonl"`` from the file's suffix; a :class:`DataError` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: expected a .csv or .jsonl file, got {suffix or 'no suffix'!r}")
    return FORMATS[suffix]


def _jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object per line, got "
                                f"{type(obj).__name__}")
            yield number, obj


def columns(path: str | os.PathLike) -> list[str]:
    """The column names of ``path``, from its header only.

    Raises:
      DataError: another suffix, an empty file, a first line that is not a JSON object.
    """
    path = Path(path)
    kind = file_format(path)
    if kind == "csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), None)
        if not header:
            raise DataError(f"{path}: empty file (expected a header row)")
        return [h.strip() for h in header]
    for _, obj in _jsonl_objects(path):
        return list(obj)
    raise DataError(f"{path}: no JSON object in the file")


def check_columns(path: str | os.PathLike, wanted: dict[str, str | None]) -> None:
    """Each column of ``wanted`` (``{what: column}``, ``None``: not asked) is a column of
    ``path`` (its header only is read).

    Raises:
      DataError: naming the column, the file and its columns; its ``key`` is the ``wanted`` key
        of the missing column.
    """
    have = columns(path)
    for key, column in wanted.items():
        if column is not None and column not in have:
            error = DataError(f"column {column!r} is not in {path} (its columns: "
                              f"{', '.join(map(repr, have))})")
            error.key = key
            raise error


class Rows(NamedTuple):
    """What :func:`read` returns: ``texts``, raw ``labels`` (``None`` without a label column)
    and the file ``line`` of each row."""
    texts: list[str]
    labels: list[Any] | None
    lines: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def read(path: str | os.PathLike, text_column: str, label_column: str | None = None) -> Rows:
    """Every row of ``path``: its ``text_column`` (a string) and ``label_column``.

    Raises:
      DataError: a missing column in some row, an empty label, a text that is not a string,
        or a file without rows; naming the file and line.
    """
    path = Path(path)
    check_columns(path, {"text": text_column, "label": label_column})
    if file_format(path) == "csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader)]
            records = [(reader.line_num, dict(zip(header, row))) for row in reader if row]
    else:
        records = list(_jsonl_objects(path))
    texts, labels, lines = [], [] if label_column else None, []
    for number, rec in records:
        text = rec.get(text_column)
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: column {text_column!r} is "
                            f"{'missing' if text is None else type(text).__name__}; expected "
                            f"a text")
        texts.append(text)
        lines.append(number)
        if label_column:
            label = rec.get(label_column)
            if label is None or (isinstance(label, str) and not label.strip()):
                raise DataError(f"{path}:{number}: no label in column {label_column!r}")
            if isinstance(label, (list, dict)):
                raise DataError(f"{path}:{number}: label {label!r} is not a class name or an "
                                f"integer")
            labels.append(label.strip() if isinstance(label, str) else label)
    if not texts:
        raise DataError(f"{path}: no rows")
    return Rows(texts, labels, lines)


_INT = re.compile(r"[+-]?\d+")


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value)
    return None


def _as_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    as_int = _as_int(value)
    return str(as_int) if as_int is not None else str(value)


class LabelMap(NamedTuple):
    """Class ``labels`` (ints or strings) in id order: ``labels[i]`` is class ``i``."""
    labels: tuple[Any, ...]

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> "LabelMap":
        """The classes of ``values``: integers (or strings spelling them) in numeric order,
        anything else as strings in sorted order."""
        ints = [_as_int(v) for v in values]
        if all(i is not None for i in ints):
            return cls(tuple(sorted(set(ints))))
        return cls(tuple(sorted({_as_name(v) for v in values})))

    @classmethod
    def from_json(cls, labels: Sequence[Any]) -> "LabelMap":
        return cls(tuple(labels))

    def to_json(self) -> list[Any]:
        return list(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def numeric(self) -> bool:
        return all(isinstance(x, int) for x in self.labels)

    def ids(self, values: Sequence[Any], where: str = "") -> np.ndarray:
        """The class ids of ``values`` (int32).

        Raises:
          DataError: a value that is none of the classes (naming it and the classes).
        """
        index = {x: i for i, x in enumerate(self.labels)}
        out = np.empty(len(values), np.int32)
        for n, v in enumerate(values):
            key = _as_int(v) if self.numeric else _as_name(v)
            if key not in index:
                raise DataError(f"{where}label {v!r} (row {n + 1}) is not one of the classes the "
                                f"run was trained on: {', '.join(map(repr, self.labels))}")
            out[n] = index[key]
        return out


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_rows(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write ``rows`` (dicts with the same keys) as CSV or JSON Lines, by ``path``'s suffix."""
    path = Path(path)
    if file_format(path) == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    with open(path, "w", encoding="utf-8", newline="") as f:
        fields = list(rows[0]) if rows else []
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
