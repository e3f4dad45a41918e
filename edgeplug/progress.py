"""Progress of long work: bars on stderr, shown only on a terminal.

Library code opens a `Progress` around every piece of work that can take more than a
second or two (a pass, a profiling phase, an epoch, a fleet round) and says what it is
doing; whether anything is drawn is decided here, once per process: on when stderr is a
terminal, off under `-q`/`--no-progress` (the CLI calls `set_enabled(False)`) and when
output is piped or captured. A bar's elapsed time keeps ticking while a step runs, so a
person watching a long pass sees that it is alive.

    with Progress("rewrite", total=len(passes), unit="pass") as bar:
        for name in passes:
            bar.status(f"{name}: rewrite_forward")
            ...
            bar.advance()
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType
from typing import Any

_enabled: bool | None = None
TICK_SECONDS = 1.0
"""How often a bar is redrawn while nothing advances (its clock keeps moving)."""


def set_enabled(value: bool | None) -> bool | None:
    """Force progress on (True) or off (False), or back to automatic (None: when stderr is a terminal).
    Returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, value
    return previous


def enabled() -> bool:
    """Whether bars are drawn now."""
    if _enabled is not None:
        return _enabled
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


class Progress:
    """One bar: a count of `total` items (or an open count when None), the current activity, a running clock.

    A context manager; nested bars stack below their parent. When progress is off, every method
    is a no-op, so callers never check.
    """

    def __init__(self, description: str, total: int | None = None, *, unit: str = "it", show: bool = True) -> None:
        """`show=False` draws nothing whatever the setting (a caller's own switch, e.g. `Trainer(progress=False)`)."""
        self.description = description
        self.total = total
        self.unit = unit
        self._bar: Any = None
        self._show = show
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> Progress:
        if self._show and enabled():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.description, unit=self.unit, file=sys.stderr, leave=False,
                             dynamic_ncols=True, mininterval=0.2, bar_format=None if self.total else
                             "{desc}: {n_fmt} {unit} [{elapsed}{postfix}]")
            self._ticker = threading.Thread(target=self._tick, name="edgeplug-progress", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            bar = self._bar
            if bar is not None:
                bar.refresh()

    def status(self, text: str) -> None:
        """Say what is running now (shown after the count)."""
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=True)

    def set_total(self, total: int | None) -> None:
        """Change how many items there are (work found to be larger once it started)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def advance(self, count: int = 1, status: str | None = None) -> None:
        """Count `count` more items done; optionally say what runs next."""
        if self._bar is not None:
            if status is not None:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(count)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
