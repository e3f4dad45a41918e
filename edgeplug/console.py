"""What a command prints, and where: one convention for every `edgeplug` command, plugins' included.

- The **result** goes to stdout: text for people, or, with `--json`, one JSON document and nothing
  else (`print_result`). Files are written only where the user names one.
- What happens on the way is **logged** by library code (`logging.getLogger(__name__)`); the CLI
  formats it (`cli_logging`): like pip, information goes to stdout in text mode and to stderr with
  `--json`; warnings and errors always go to stderr. `-q` hides information, `-qq` the result too,
  `-v` shows debug messages.
- **Progress** bars go to stderr and only to a terminal (`edgeplug.progress`).

Outside the CLI nothing is configured: a program that imports edgeplug sees its log records through
its own logging setup, and `print_result` prints the text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from edgeplug.terminal import escape_keeping_lines

LOGGER_NAME = "edgeplug"
"""Root of edgeplug's loggers (library code: `logging.getLogger(__name__)`; plugins: `edgeplug.plugins.<name>`)."""


@dataclasses.dataclass
class OutputMode:
    """How the running command prints (set by the CLI for the length of one command)."""

    json: bool = False
    quiet: int = 0
    verbose: int = 0
    result_printed: bool = False
    stdout: TextIO | None = None
    """The stream the JSON document goes to (the real stdout while the command's own prints are captured)."""


_mode = OutputMode()


def output_mode() -> OutputMode:
    """The current command's output settings (defaults outside the CLI: text, not quiet)."""
    return _mode


def print_result(document: Any, text: str | Callable[[], str] | None = None) -> int:
    """Print a command's result and return 0 (the exit status), so a command can end `return print_result(...)`.

    With `--json`, `document` (JSON values only) is printed as one indented JSON document; otherwise
    `text` (a string, or a function that builds it, called only in text mode), unless `-qq`. Without
    `text`, text mode prints the document as JSON too. A command prints one result.
    """
    mode = _mode
    if mode.result_printed:
        raise RuntimeError("a command prints one result (print_result was called twice)")
    mode.result_printed = True
    if mode.json:
        stream = mode.stdout or sys.stdout
        stream.write(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        stream.flush()
        return 0
    if mode.quiet >= 2:
        return 0
    shown = text() if callable(text) else text
    print(json.dumps(document, indent=2, ensure_ascii=False) if shown is None else shown, flush=True)
    return 0


class _CliHandler(logging.Handler):
    """Formats edgeplug's log records for a terminal: information as plain lines, problems prefixed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                stream, text = sys.stderr, f"edgeplug: error: {message}"
            elif record.levelno >= logging.WARNING:
                stream, text = sys.stderr, f"edgeplug: warning: {message}"
            else:
                stream = sys.stderr if _mode.json else sys.stdout
                text = message if record.levelno >= logging.INFO else f"debug: {record.name}: {message}"
            with _bars_cleared(stream):
                stream.write(escape_keeping_lines(text) + "\n")
                stream.flush()
        except Exception:  # noqa: BLE001 - logging must never end the command
            self.handleError(record)


@contextlib.contextmanager
def _bars_cleared(stream: TextIO) -> Iterator[None]:
    """Progress bars (stderr) step aside while a line is written, then redraw below it."""
    from tqdm import tqdm

    with tqdm.external_write_mode(file=stream):
        yield


@contextlib.contextmanager
def cli_logging(*, json_output: bool, quiet: int, verbose: int) -> Iterator[OutputMode]:
    """Set the output mode and route edgeplug's (and, with `-vv`, every library's) log records to the terminal
    for one command; restored afterwards, so `main()` can run many times in one process (tests)."""
    global _mode
    previous_mode = _mode
    _mode = OutputMode(json=json_output, quiet=quiet, verbose=verbose)
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    handler = _CliHandler(level)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(LOGGER_NAME)
    saved = (logger.level, logger.propagate)
    logger.setLevel(level)
    logger.addHandler(handler)
    logger.propagate = False  # the application's root handlers (pytest's, say) would print them twice
    root = logging.getLogger()
    root_saved = root.level
    if verbose >= 2:  # third parties (Flower, onnx-ir) too
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
    try:
        yield _mode
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        if verbose >= 2:
            root.removeHandler(handler)
            root.setLevel(root_saved)
        _mode = previous_mode


@contextlib.contextmanager
def captured_for_json() -> Iterator[io.StringIO]:
    """With `--json`, what a command prints with `print` is held back, so stdout carries only the document.

    The CLI then prints the held text as the document (`{"output": ...}`) when the command printed no
    result of its own (a plugin written before `print_result`), or moves it to stderr when it did.
    """
    held = io.StringIO()
    real = sys.stdout
    _mode.stdout = real
    sys.stdout = held
    try:
        yield held
    finally:
        sys.stdout = real
        _mode.stdout = None
