"""API tokens: created with a role, looked up by the SHA-256 of the presented secret, revoked by name.

A token is `clst_` + 32 random bytes (URL-safe base64): high-entropy, so a plain SHA-256 stored in the database is
enough (a slow password hash protects guessable secrets; these are not). The secret is returned once by
`create_token` and never stored.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from replay_store.models import ApiToken, utcnow
from replay_store.naming import identifier_problem
from replay_store.store import Store

ROLES = ("camera", "operator", "admin")
TOKEN_PREFIX = "clst_"


def token_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(store: Store, name: str, role: str, created_by: str) -> tuple[ApiToken, str]:
    """A new token: its row and the secret (shown once). ValueError for a bad name or role, or a name in use."""
    if problem := identifier_problem("token name", name):
        raise ValueError(problem)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if problem := identifier_problem("created_by", created_by):
        raise ValueError(problem)
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(name=name, role=role, token_sha256=token_digest(secret), created_by=created_by, created_at=utcnow())
    try:
        with store.session() as session:
            session.add(row)
            session.commit()
            session.refresh(row)
    except IntegrityError as exc:
        raise ValueError(f"a token named {name!r} exists already (names are never reused, even revoked)") from exc
    return row, secret


def list_tokens(store: Store) -> list[ApiToken]:
    with store.session() as session:
        return list(session.exec(select(ApiToken).order_by(col(ApiToken.id))))


def revoke_token(store: Store, name: str) -> ApiToken:
    """Revoke a token by name (KeyError when there is none); revoking twice keeps the first time."""
    with store.session() as session:
        row = session.exec(select(ApiToken).where(col(ApiToken.name) == name)).first()
        if row is None:
            raise KeyError(f"no token named {name!r}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
        return row


def find_token(store: Store, secret: str) -> ApiToken | None:
    """The token row of a presented secret, revoked or not; None when no token has it."""
    with store.session() as session:
        return session.exec(select(ApiToken).where(col(ApiToken.token_sha256) == token_digest(secret))).first()
