"""FastAPI dependencies: the app's services, a database session, the signed-in user, CSRF checks."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends, Request
from itsdangerous import BadSignature, Signer
from sqlalchemy.orm import Session

from webapp import accounts
from webapp.db import session_scope
from webapp.errors import CsrfError, NotAuthenticated
from webapp.models import User, WebSession, utcnow

SESSION_COOKIE = "pneumoscope_session"
LOGIN_COOKIE = "pneumoscope_login"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


@dataclass
class Principal:
    user: User
    session: WebSession | None = None  # None when signed in with an API token

    @property
    def csrf_token(self) -> str:
        return self.session.csrf_token if self.session else ""


def ctx(request: Request):
    return request.app.state.ctx


def db_session(request: Request):
    """One session per request; routes commit what they change."""
    with session_scope(ctx(request).factory) as session:
        yield session


def session_signer(request: Request) -> Signer:
    return Signer(ctx(request).secret_key, salt="pneumoscope-session")


def authenticate(request: Request, db: Session) -> Principal:
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthenticated("send the API token as 'Authorization: Bearer <token>'", "invalid")
        row = accounts.find_token(db, token.strip())
        if row is None:
            raise NotAuthenticated("invalid API token", "invalid")
        if row.revoked_at is not None:
            raise NotAuthenticated("this API token has been revoked", "revoked")
        now = utcnow()
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            row.last_used_at = now  # at most one write a minute per token
            db.commit()
        return Principal(row.user)
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        raise NotAuthenticated("sign in first (or send an API token)", "signin")
    try:
        token = session_signer(request).unsign(cookie).decode()
    except BadSignature:
        raise NotAuthenticated("invalid session cookie; sign in again", "invalid") from None
    session = accounts.find_session(db, token)
    if session is None or accounts.is_expired(session.expires_at):
        raise NotAuthenticated("your session has expired; sign in again", "expired")
    return Principal(session.user, session)


def page_principal(request: Request, db: Session = Depends(db_session)) -> Principal:
    return authenticate(request, db)


def api_principal(request: Request, db: Session = Depends(db_session)) -> Principal:
    """The API takes a bearer token or the page's session; with the session, writes need the CSRF header."""
    principal = authenticate(request, db)
    if principal.session is not None and request.method not in SAFE_METHODS:
        check_csrf(principal, request.headers.get(CSRF_HEADER))
    return principal


def check_csrf(principal: Principal, presented: str | None) -> None:
    if not presented:
        raise CsrfError("missing CSRF token: reload the page and try again")
    if principal.session is None or not hmac.compare_digest(presented, principal.session.csrf_token):
        raise CsrfError("invalid CSRF token: reload the page and try again")


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def is_https(request: Request) -> bool:
    mode = ctx(request).settings.cookie_secure
    return mode == "always" or (mode == "auto" and request.url.scheme == "https")
