"""Log lines that a client cannot forge: control characters in what is logged are escaped.

Paths, field names, model names and error messages come from clients; a newline in one would start a
line of the client's own making, and a NUL or an escape sequence would reach whoever reads the log.
EscapeControl rewrites each record before any handler formats it: the message and its string
arguments get their control characters (C0, DEL, C1, line and paragraph separators, bidirectional
overrides, lone surrogates) written as `\\n`, `\\x00`, `\\u2028`, ...; a traceback keeps its line
breaks but every line of it is indented, so no line of it can pass for a record of its own.
"""

from __future__ import annotations

import logging
import re

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROL_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
TRACEBACK_INDENT = "    "
# Loggers whose records carry what clients sent: ours, and uvicorn's (its access log writes the path).
SERVER_LOGGERS = ("duospec.server", "uvicorn", "uvicorn.error", "uvicorn.access")


def _escaped_character(match: re.Match) -> str:
    character = match.group()
    if character in _NAMED:
        return _NAMED[character]
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with every control character written as an escape (idempotent: the result has none)."""
    return _CONTROL.sub(_escaped_character, text)


def _indented(text: str) -> str:
    """A traceback: line breaks kept, every other control character escaped, every line indented."""
    return "\n".join(TRACEBACK_INDENT + _CONTROL_BUT_NEWLINE.sub(_escaped_character, line) for line in text.splitlines())


def _safe_argument(value):
    if isinstance(value, str):
        return escape_control(value)
    if value is None or isinstance(value, (int, float)):
        return value  # %d, %.2f and friends keep working
    return escape_control(str(value))


class EscapeControl(logging.Filter):
    """Escapes the control characters of a record's message and arguments (and indents its traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_duospec_escaped", False):
            return True
        record._duospec_escaped = True
        if isinstance(record.msg, str):
            record.msg = escape_control(record.msg)
        else:
            record.msg = escape_control(str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(_safe_argument(value) for value in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _safe_argument(value) for key, value in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = _indented(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = _indented(record.exc_text)
        if record.stack_info:
            record.stack_info = _indented(record.stack_info)
        return True


def install_log_escaping(names: tuple[str, ...] = SERVER_LOGGERS) -> None:
    """EscapeControl on each named logger and on each of its handlers (once; safe to call again).

    On the logger: records made there are escaped whatever handler ends up writing them; on its
    handlers: records that reach them from other loggers are escaped too."""
    for name in names:
        logger = logging.getLogger(name)
        for holder in (logger, *logger.handlers):
            if not any(isinstance(existing, EscapeControl) for existing in holder.filters):
                holder.addFilter(EscapeControl())
