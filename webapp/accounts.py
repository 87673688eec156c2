"""Users, passwords, API tokens, sessions and the sign-in rate limits: the storage side of authentication.

Used by the routes (through :mod:`webapp.dependencies`) and by ``pneumoscope users``. Passwords are
hashed with argon2id (argon2-cffi's defaults, RFC 9106 low-memory profile); API and session tokens
are 256-bit random values stored as SHA-256, so a stolen database yields no usable credential.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from webapp.models import ApiToken, LoginAttempt, User, WebSession, utcnow

TOKEN_PREFIX = "pns_"
MIN_PASSWORD_LENGTH = 10
_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_hasher = PasswordHasher()
# Verifying against this keeps the time of "no such user" equal to "wrong password".
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A refused account operation (bad name, weak password, unknown user): one line for the user."""


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def check_username(name: str) -> str:
    if not _USERNAME.match(name or ""):
        raise AccountError(f"invalid user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-', "
                           "starting with a letter or digit")
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"the password is too short: at least {MIN_PASSWORD_LENGTH} characters")
    return password


def find_user(db: Session, username: str) -> User | None:
    return db.scalar(select(User).where(User.username == username))


def add_user(db: Session, username: str, password: str, admin: bool = False) -> User:
    check_username(username)
    check_password(password)
    if find_user(db, username) is not None:
        raise AccountError(f"user {username!r} already exists")
    user = User(username=username, password_hash=_hasher.hash(password), is_admin=admin)
    db.add(user)
    db.flush()
    return user


def set_password(db: Session, username: str, password: str) -> User:
    user = require_user(db, username)
    user.password_hash = _hasher.hash(check_password(password))
    db.execute(delete(WebSession).where(WebSession.user_id == user.id))  # sign out everywhere
    return user


def require_user(db: Session, username: str) -> User:
    user = find_user(db, username)
    if user is None:
        raise AccountError(f"no user named {username!r} (create one with `pneumoscope users add {username}`)")
    return user


def verify_password(db: Session, username: str, password: str) -> User | None:
    user = find_user(db, username)
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return user


# -- sign-in rate limits ---------------------------------------------------------------------------

@dataclass
class RateLimit:
    window_s: float
    per_user: int
    per_client: int


def login_blocked(db: Session, username: str, client: str, limit: RateLimit, per_user: bool = True) -> float | None:
    """Seconds until the next attempt is allowed, or None when it is allowed now. ``per_user=False`` (a known
    device): only ``client``'s own failures count, at the per-user limit."""
    since = utcnow() - timedelta(seconds=limit.window_s)
    checks = ([(LoginAttempt.username, attempted_name(username), limit.per_user)] if per_user else []) + \
        [(LoginAttempt.client, client, limit.per_client if per_user else limit.per_user)]
    for column, value, most in checks:
        count, oldest = db.execute(select(func.count(), func.min(LoginAttempt.at))
                                   .where(column == value, LoginAttempt.at > since)).one()
        if count >= most:
            oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=since.tzinfo)
            return max(1.0, (oldest - since).total_seconds())
    return None


def attempted_name(username: str) -> str:
    """How a failed sign-in's user name is kept for the limits: hashed, since a person may type anything there
    (a patient's name in the wrong field, a password)."""
    return sha256(username.lower())


def record_failure(db: Session, username: str, client: str) -> None:
    db.add(LoginAttempt(username=attempted_name(username), client=client[:64]))


def forget_failures(db: Session, username: str, client: str, window_s: float) -> None:
    """A successful sign-in clears that user's failures from the same client (not those of someone guessing
    elsewhere: they would get a fresh set of guesses each time the user signs in); old rows are pruned too."""
    db.execute(delete(LoginAttempt).where(LoginAttempt.username == attempted_name(username),
                                          LoginAttempt.client == client))
    db.execute(delete(LoginAttempt).where(LoginAttempt.at < utcnow() - timedelta(seconds=window_s)))


# -- sessions ----------------------------------------------------------------------------------------

def open_session(db: Session, user: User, hours: float) -> tuple[str, WebSession]:
    """A new session for ``user``; returns the cookie value (shown once) and the row."""
    token = secrets.token_urlsafe(32)
    row = WebSession(token_hash=sha256(token), user_id=user.id, csrf_token=secrets.token_urlsafe(32),
                     expires_at=utcnow() + timedelta(hours=hours))
    db.add(row)
    db.execute(delete(WebSession).where(WebSession.expires_at < utcnow()))
    db.flush()
    return token, row


def find_session(db: Session, token: str) -> WebSession | None:
    return db.scalar(select(WebSession).where(WebSession.token_hash == sha256(token)))


def close_session(db: Session, token: str) -> None:
    db.execute(delete(WebSession).where(WebSession.token_hash == sha256(token)))


# -- API tokens --------------------------------------------------------------------------------------

def issue_token(db: Session, username: str, label: str = "") -> tuple[str, ApiToken]:
    user = require_user(db, username)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, label=label[:100], token_hash=sha256(token))
    db.add(row)
    db.flush()
    return token, row


def find_token(db: Session, token: str) -> ApiToken | None:
    """The live token row for a presented bearer token (None if unknown or revoked)."""
    row = db.scalar(select(ApiToken).where(ApiToken.token_hash == sha256(token)))
    return row


def revoke_token(db: Session, token_or_id: str) -> list[ApiToken]:
    """Revoke one token given by its value or its id; returns what was revoked."""
    if token_or_id.isdigit():
        rows = list(db.scalars(select(ApiToken).where(ApiToken.id == int(token_or_id))))
    else:
        rows = list(db.scalars(select(ApiToken).where(ApiToken.token_hash == sha256(token_or_id))))
    if not rows:
        raise AccountError("no such token (give the token itself or its id from `pneumoscope users tokens NAME`)")
    now = utcnow()
    for row in rows:
        row.revoked_at = row.revoked_at or now
    return rows


def revoke_all_tokens(db: Session, username: str) -> int:
    user = require_user(db, username)
    result = db.execute(update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
                        .values(revoked_at=utcnow()))
    return result.rowcount


def list_tokens(db: Session, username: str) -> list[ApiToken]:
    user = require_user(db, username)
    return list(db.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))


def is_expired(moment: datetime) -> bool:
    return moment <= utcnow()
