"""Text from models, recipes and plugins reaches the terminal escaped: no control sequences.

A model is someone else's file: a tensor named `x\\x1b]0;PWNED\\x07\\x1b[2J` would
retitle and clear the user's terminal if printed raw, and a name holding a newline
would forge lines of output. `escape` makes any text one inert line; the CLI
also sends its whole standard output through `EscapingWriter`, which keeps only the
newlines (and tabs) its own formatting wrote.
"""

from __future__ import annotations

import io
from typing import TextIO


def escape(text: object) -> str:
    """`text` on one line: every non-printable character (C0/C1 controls, newlines, bidi overrides)
    written as its Python escape (`\\x1b`, `\\n`, `\\u202e`)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))


def escape_keeping_lines(text: str) -> str:
    """Newlines and tabs stay (multi-line output the caller formatted); other non-printable characters
    become JSON-style `\\uXXXX` escapes, so that JSON printed through it stays valid JSON."""
    return "".join(c if c.isprintable() or c in " \n\t" else _json_escape(c) for c in text)


def _json_escape(character: str) -> str:
    code = ord(character)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON writes characters beyond the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


class EscapingWriter(io.TextIOBase):
    """A text stream that escapes control characters before they reach the wrapped stream."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(escape_keeping_lines(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")
