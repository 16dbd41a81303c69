"""Progress of a training loop: a bar on a terminal, plain periodic lines anywhere else.

Every recipe reports its steps through :class:`Progress` (:func:`jpeft.recipes.classification.
train`, the command line's decoder fine-tuning): when the stream it writes to is a terminal it
draws a ``tqdm`` bar; otherwise (a log file, a pipe, a notebook's captured output, a test) it
prints one plain line every ``every`` steps and at the last one, so that a log gets a handful of
readable lines instead of every redraw of a bar.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (``False`` for anything that cannot say)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def default_every(total: int) -> int:
    """The plain-line interval for ``total`` steps: about ten lines per loop."""
    return max(1, total // 10)


class Progress:
    """Progress of ``total`` steps called ``desc``.

    Args:
      total: the number of steps.
      desc: what runs (the bar's label, each line's start).
      stream: where to write (default ``sys.stdout``, looked up when created).
      every: steps between plain lines (default :func:`default_every`).
      bar: ``True``/``False`` force the bar or the plain lines; ``None`` (default) draws the bar
        exactly when ``stream`` is a terminal.

    ``update(n, **postfix)`` advances by ``n`` steps; ``postfix`` values (e.g. ``loss=0.41``) are
    shown on the bar or printed on each line. ``close()`` ends the bar (a context manager closes
    it too).
    """

    def __init__(self, total: int, desc: str = "fine-tuning", *, stream: TextIO | None = None,
                 every: int | None = None, bar: bool | None = None, unit: str = "step"):
        self.total = int(total)
        self.desc = desc
        self.stream = sys.stdout if stream is None else stream
        self.every = default_every(self.total) if every is None else max(1, int(every))
        self.done = 0
        self.start = time.perf_counter()
        self.tty = is_terminal(self.stream) if bar is None else bool(bar)
        self._bar = None
        if self.tty:
            from tqdm import tqdm
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1, **postfix: Any) -> None:
        before, self.done = self.done, self.done + n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _shown(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)
            return
        if self.done // self.every > before // self.every or self.done >= self.total > before:
            seconds = time.perf_counter() - self.start
            extra = "".join(f", {k} {_shown(v)}" for k, v in postfix.items())
            print(f"{self.desc}: step {self.done}/{self.total}{extra} ({seconds:.1f} s, "
                  f"{seconds / max(self.done, 1):.3f} s/step)", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
