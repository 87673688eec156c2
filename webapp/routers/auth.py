"""Sign-in and sign-out pages. The sign-in form carries a CSRF token bound to a short-lived cookie
(login CSRF); failures are rate-limited per user name and per client address, within a window (so a
lockout always ends), and a browser that signed in as that user before (a signed device cookie) is
limited on its own failures only, so that someone guessing a user's password does not lock the user
out of their own browser. A sign-in closes whatever session the browser presented (no session fixation).
Every attempt is in the audit log."""

from __future__ import annotations

import asyncio
import hmac
import secrets

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse
from itsdangerous import BadSignature, SignatureExpired, TimestampSigner
from sqlalchemy.orm import Session

from webapp import accounts, audit
from webapp.dependencies import (LOGIN_COOKIE, SESSION_COOKIE, Principal, check_csrf, client_address, ctx,
                                 db_session, is_https, page_principal, session_signer)
from webapp.errors import CsrfError

router = APIRouter(include_in_schema=False)

LOGIN_FORM_MAX_AGE_S = 3600
#: Marks a browser that signed in as a user before (signed; the user name and a random device id).
DEVICE_COOKIE = "pneumoscope_device"
DEVICE_COOKIE_MAX_AGE_S = 90 * 24 * 3600
#: The audit log's actor for an attempt on a user name that does not exist (the name itself is not kept).
UNKNOWN_ACTOR = "(unknown)"
REASONS = {"expired": "Your session has expired. Please sign in again.",
           "signed_out": "You have signed out.",
           "invalid": "Please sign in again.",
           "signin": ""}


def _login_signer(request: Request) -> TimestampSigner:
    return TimestampSigner(ctx(request).secret_key, salt="pneumoscope-login")


def _safe_next(target: str | None) -> str:
    """Only same-site paths: no open redirect to another host."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/"


def _login_page(request: Request, message: str = "", error: str = "", status: int = 200, username: str = "",
                next_url: str = "/"):
    nonce = secrets.token_urlsafe(24)
    token = _login_signer(request).sign(nonce).decode()
    response = ctx(request).templates.TemplateResponse(
        request, "login.html", {"user": None, "message": message, "error": error, "csrf_token": token,
                                "username": username, "next": _safe_next(next_url)}, status_code=status)
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=LOGIN_FORM_MAX_AGE_S, httponly=True, samesite="lax",
                        secure=is_https(request), path="/login")
    return response


@router.get("/login")
async def login_form(request: Request, reason: str = "", next: str = "/"):
    return _login_page(request, message=REASONS.get(reason, ""), next_url=next)


@router.post("/login")
async def login(request: Request, username: str = Form(""), password: str = Form(""), csrf_token: str = Form(""),
                next: str = Form("/"), db: Session = Depends(db_session)):
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    try:
        signed = _login_signer(request).unsign(csrf_token, max_age=LOGIN_FORM_MAX_AGE_S).decode()
    except SignatureExpired:
        return _login_page(request, error="The sign-in form expired. Please try again.", status=403,
                           username=username, next_url=next)
    except BadSignature:
        signed = ""
    if not signed or not nonce or not hmac.compare_digest(signed, nonce):
        raise CsrfError("missing or invalid CSRF token on the sign-in form: reload the page and try again")
    context = ctx(request)
    settings = context.settings
    address = client_address(request)
    # A browser that signed in as this user before is a known device: failures elsewhere (an attacker
    # guessing this user's password) do not lock it out; its own failures are limited on their own.
    device = _known_device(request, username)
    client = f"device:{device}" if device else address
    limit = accounts.RateLimit(settings.login_window_s, settings.login_max_failures_per_user,
                               settings.login_max_failures_per_client)
    wait = accounts.login_blocked(db, username, client, limit, per_user=device is None)
    known = accounts.find_user(db, username)
    if wait is not None:
        audit.record(db, "sign_in_refused", known or UNKNOWN_ACTOR, client=address,
                     detail=_attempt_detail(known, device))
        db.commit()
        minutes = max(1, round(wait / 60))
        return _login_page(request, error=f"Too many failed sign-ins. Try again in {minutes} minute"
                           f"{'s' if minutes != 1 else ''}.", status=429, username=username, next_url=next)
    # argon2 is deliberately slow: keep it off the event loop.
    user = await asyncio.to_thread(accounts.verify_password, db, username, password)
    if user is None:
        accounts.record_failure(db, username, client)
        audit.record(db, "sign_in_failed", known or UNKNOWN_ACTOR, client=address,
                     detail=_attempt_detail(known, device))
        db.commit()
        return _login_page(request, error="Wrong user name or password.", status=401, username=username,
                           next_url=next)
    accounts.forget_failures(db, username, client, settings.login_window_s)
    # Session fixation: whatever session this browser presented is closed; the new one gets a new id.
    presented = _presented_session_token(request)
    if presented:
        accounts.close_session(db, presented)
    token, _ = accounts.open_session(db, user, settings.session_hours)
    audit.record(db, "signed_in", user, client=address, detail="known device" if device else "new device")
    db.commit()
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, session_signer(request).sign(token).decode(),
                        max_age=int(settings.session_hours * 3600), httponly=True, samesite="lax",
                        secure=is_https(request), path="/")
    response.set_cookie(DEVICE_COOKIE, _device_signer(request).sign(
                            f"{user.username.lower()}:{device or secrets.token_urlsafe(16)}").decode(),
                        max_age=DEVICE_COOKIE_MAX_AGE_S, httponly=True, samesite="strict", secure=is_https(request),
                        path="/login")
    response.delete_cookie(LOGIN_COOKIE, path="/login")
    return response


def _attempt_detail(known, device: str | None) -> str:
    # An unknown name is not written down: it may be a typo of a password, or anything else a person typed.
    return ("known device" if device else "new device") if known else "unknown user name"


def _device_signer(request: Request) -> TimestampSigner:
    return TimestampSigner(ctx(request).secret_key, salt="pneumoscope-device")


def _known_device(request: Request, username: str) -> str | None:
    """The device id of a valid device cookie issued to ``username``, else None."""
    cookie = request.cookies.get(DEVICE_COOKIE, "")
    if not cookie or not username:
        return None
    try:
        value = _device_signer(request).unsign(cookie, max_age=DEVICE_COOKIE_MAX_AGE_S).decode()
    except (BadSignature, SignatureExpired):
        return None
    name, _, device = value.rpartition(":")
    return device if device and hmac.compare_digest(name, username.lower()) else None


def _presented_session_token(request: Request) -> str | None:
    cookie = request.cookies.get(SESSION_COOKIE, "")
    if not cookie:
        return None
    try:
        return session_signer(request).unsign(cookie).decode()
    except BadSignature:
        return None


@router.post("/logout")
async def logout(request: Request, csrf_token: str = Form(""), principal: Principal = Depends(page_principal),
                 db: Session = Depends(db_session)):
    check_csrf(principal, csrf_token)
    cookie = request.cookies.get(SESSION_COOKIE, "")
    token = session_signer(request).unsign(cookie).decode()
    accounts.close_session(db, token)
    audit.record(db, "signed_out", principal.user, client=client_address(request))
    db.commit()
    response = RedirectResponse("/login?reason=signed_out", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
