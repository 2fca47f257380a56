"""The error a job spec raises, and the quoting its messages use.

Its own module so that the validation (`spec.py`) and the conversion to the model's configs
(`spec_configs.py`) raise the same `SpecError` without importing each other.
"""

from __future__ import annotations

from typing import Any

INT32_MAX = 2**31 - 1
# Values quoted in messages are cut to this many characters (a name may be megabytes long).
_QUOTE_MAX = 48


class SpecError(ValueError):
    """A job spec that cannot run: `field` is its dotted path, `value` the offending value.

    `str(error)` is the message alone: one sentence that names the field and quotes the value.
    """

    def __init__(self, field: str, value: Any, message: str):
        super().__init__(message)
        self.field = field
        self.value = value
        self.message = message


class InfeasibleSpecError(SpecError):
    """A well-formed spec that the current cluster can never run (RESOURCE_EXHAUSTED)."""


def quote(value: Any) -> str:
    """The repr of a value, cut short so that an absurd value still gives a one-line message."""
    text = repr(value)
    if len(text) > _QUOTE_MAX:
        text = text[: _QUOTE_MAX - 3] + "..."
    return text.replace("\n", "\\n")
