"""Who may call what: bearer tokens in gRPC metadata, one role each, checked before a call starts.

`authorization: Bearer <token>` metadata on every InspectionService call when `auth` is on (health checks and
reflection stay open: probes need them). No token, an unknown or a revoked one: UNAUTHENTICATED. A role that
may not call the method: PERMISSION_DENIED. `admin` may call everything. Tokens are looked up by their SHA-256
(`replay_store.tokens`) and remembered for `cache_s` seconds, so a revocation takes effect within that time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from cl_service.errors import ErrorCode, ServiceError
from replay_store.store import Store
from replay_store.tokens import find_token

CAMERA, OPERATOR, ADMIN = "camera", "operator", "admin"
ALLOWED: dict[str, frozenset[str]] = {
    "Ingest": frozenset({CAMERA, ADMIN}),
    "Classify": frozenset({CAMERA, OPERATOR, ADMIN}),
    "GetStatus": frozenset({CAMERA, OPERATOR, ADMIN}),
    "SubmitCorrection": frozenset({OPERATOR, ADMIN}),
    "ListReviewQueue": frozenset({OPERATOR, ADMIN}),
    "GetSample": frozenset({OPERATOR, ADMIN}),
    "WatchAlerts": frozenset({OPERATOR, ADMIN}),
    "AcknowledgeAlert": frozenset({OPERATOR, ADMIN}),
    "ListModels": frozenset({OPERATOR, ADMIN}),
    "WatchUpdate": frozenset({OPERATOR, ADMIN}),
    "TriggerUpdate": frozenset({ADMIN}),
    "ActivateModel": frozenset({ADMIN}),
}
MAX_TOKEN_CHARS = 512


class Authenticator:
    """Checks a call's metadata against the token table and `ALLOWED`."""

    def __init__(self, store: Store, *, cache_s: float = 5.0) -> None:
        self.store = store
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, str | None]] = {}  # secret -> (looked up at, role or None)

    async def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """The caller's role; ServiceError UNAUTHENTICATED / PERMISSION_DENIED otherwise."""
        secret = _bearer(metadata)
        role = await self._role(secret)
        if role is None:
            raise ServiceError(
                ErrorCode.UNAUTHENTICATED, "TOKEN_INVALID", "the token is unknown or revoked; ask an admin for one"
            )
        allowed = ALLOWED.get(method, frozenset({ADMIN}))
        if role not in allowed:
            raise ServiceError(
                ErrorCode.PERMISSION_DENIED,
                "ROLE_NOT_ALLOWED",
                f"{method} needs the role {' or '.join(sorted(allowed))}; this token's role is {role}",
            )
        return role

    async def _role(self, secret: str) -> str | None:
        now = time.monotonic()
        cached = self._cache.get(secret)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        row = await asyncio.to_thread(find_token, self.store, secret)
        role = None if row is None or row.revoked_at is not None else row.role
        if len(self._cache) > 10_000:  # a flood of made-up tokens must not grow memory without bound
            self._cache.clear()
        self._cache[secret] = (now, role)
        return role


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str:
    values = [value for key, value in (metadata or ()) if key == "authorization"]
    if not values:
        raise ServiceError(
            ErrorCode.UNAUTHENTICATED,
            "TOKEN_MISSING",
            "this server requires a token: send metadata 'authorization: Bearer <token>'",
        )
    value = values[0]
    scheme, _, token = value.partition(" ") if isinstance(value, str) else ("", "", "")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        raise ServiceError(
            ErrorCode.UNAUTHENTICATED, "TOKEN_MALFORMED", "the authorization metadata must be 'Bearer <token>'"
        )
    return token
