"""Errors the routes raise, and how they are answered: JSON ``{"error", "code"}`` under ``/api``, an HTML
page elsewhere. No route answers 500 for a user's mistake."""

from __future__ import annotations


class AppError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, status: int | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status or self.status
        self.code = code or self.code
        self.headers = headers or {}


class NotAuthenticated(AppError):
    """No valid credential: 401 for the API, a redirect to the sign-in page for pages."""

    status = 401
    code = "not_authenticated"

    def __init__(self, message: str, reason: str = "signin"):
        super().__init__(message, headers={"www-authenticate": "Bearer"})
        self.reason = reason  # signin | expired | invalid | revoked


class CsrfError(AppError):
    status = 403
    code = "csrf"


class NotFound(AppError):
    status = 404
    code = "not_found"


class Conflict(AppError):
    status = 409
    code = "conflict"


class TooManyAttempts(AppError):
    status = 429
    code = "rate_limited"
