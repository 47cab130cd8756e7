"""Errors that a user can fix. The CLI prints them as one line; the library never exits."""

from __future__ import annotations


class MMToolError(Exception):
    """An error caused by input or flags, with a message that says what to change."""


RECORD_FAILURES = (RecursionError, OverflowError, UnicodeError, ValueError, TypeError, MemoryError)
"""Exceptions that, raised while one record is read or tokenized, mean "this record is bad" (JSON
nested thousands deep, integers beyond int64, lone surrogates, malformed fields, a size that
cannot be allocated): `tokenizing.to_sample` turns each into a `RecordError` for that record."""


class RecordError(MMToolError):
    """One input record cannot be turned into a sample.

    Args:
        reason: what is wrong with the record, e.g. "cannot decode image: truncated file".
        location: where the record is, e.g. "sample_data/jsonl/records.jsonl:12".
    """

    def __init__(self, reason: str, location: str | None = None):
        self.reason = reason
        self.location = location
        super().__init__(f"{location}: {reason}" if location else reason)

    def at(self, location: str) -> "RecordError":
        """Returns this error with `location` filled in where it was missing."""
        if self.location is None:
            self.location = location
            self.args = (f"{location}: {self.reason}",)
        return self

    @classmethod
    def from_exception(cls, exc: BaseException) -> "RecordError":
        """A RecordError whose one-line reason names the exception's type and message."""
        text = " ".join(str(exc).split()).encode("utf-8", "backslashreplace").decode("utf-8")
        return cls(f"{type(exc).__name__}: {text[:200] or 'no message'}")


class Interrupted(MMToolError):
    """A job stopped by SIGINT or SIGTERM after saving its state; the CLI exits 130.

    Args:
        message: what was saved and how to continue, e.g. "interrupted at step 7; rerun the same
            command with --resume".
    """
