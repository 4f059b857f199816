"""AdapterError: one user-facing adapter failure with the offending field and an HTTP status."""
from __future__ import annotations

# HTTP statuses the server maps AdapterError.status onto.
INVALID = 400
NOT_FOUND = 404
EXISTS = 409
TOO_LARGE = 413
UNSUPPORTED = 422
INTERNAL = 500


class AdapterError(Exception):
    """A refused or failed adapter; `str(err)` is a sentence that names the key or field at fault."""

    def __init__(self, message: str, field: str | None = None, status: int = INVALID):
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # field and status survive pickling (errors of loads in worker processes)
        return AdapterError, (self.message, self.field, self.status)

    def __repr__(self) -> str:
        return f"AdapterError({self.message!r}, field={self.field!r}, status={self.status})"


def unsupported(message: str, field: str | None = None) -> AdapterError:
    return AdapterError(message, field, UNSUPPORTED)
