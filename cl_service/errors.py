"""Errors of the core, independent of gRPC: the API layer maps `code` to a status code.

`reason` is a stable UPPER_SNAKE_CASE token that clients can branch on; `message` is for people.
"""

from __future__ import annotations

from enum import Enum


class ErrorCode(Enum):
    """The subset of google.rpc.Code that the core uses; values are the numeric codes."""

    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    PERMISSION_DENIED = 7
    FAILED_PRECONDITION = 9
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


class ServiceError(Exception):
    """An error with a code, a machine-readable reason and a human-readable message."""

    def __init__(
        self, code: ErrorCode, reason: str, message: str, *, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = metadata  # extra trailing metadata for the client, e.g. ("retry-after-ms", "40")

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.reason}, {self.message!r})"


def invalid(reason: str, message: str) -> ServiceError:
    return ServiceError(ErrorCode.INVALID_ARGUMENT, reason, message)


def store_unavailable(reason: str) -> ServiceError:
    """The store's database cannot be reached (a PostgreSQL server down or restarting): nothing was changed."""
    return ServiceError(
        ErrorCode.UNAVAILABLE,
        "STORE_UNAVAILABLE",
        f"the store's database cannot be reached ({reason}); nothing was changed, retry shortly",
    )
