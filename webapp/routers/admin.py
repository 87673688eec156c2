"""The admins' view of the audit log: ``/admin/audit`` (a page) and ``/api/audit`` (JSON). Others get 403.

Reading the log is itself recorded (``audit_read``)."""

from __future__ import annotations

from datetime import date
from typing import Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from sqlalchemy.orm import Session

from webapp import audit
from webapp.dependencies import Principal, api_principal, client_address, db_session, page_principal
from webapp.errors import AppError
from webapp.routers.pages import render
from webapp.studies import MAX_ID, MAX_PAGE

router = APIRouter()
#: The audit actions, as the API's schema lists them.
ActionName = Literal[tuple(audit.ACTIONS)]


class AuditPage(BaseModel):
    items: list[dict]
    page: int
    per_page: int
    total: int
    pages: int


def _admin(principal: Principal) -> None:
    if not principal.user.is_admin:
        raise AppError("the audit log is for admins only", status=403, code="forbidden")


def _read(request: Request, principal: Principal, db: Session, f: audit.AuditFilter):
    _admin(principal)
    lines, total = audit.search(db, f)
    audit.record(db, "audit_read", principal.user, client=client_address(request), detail=f"page {f.page}")
    db.commit()
    return lines, total


@router.get("/api/audit", tags=["audit"], response_model=AuditPage,
            summary="admins: the audit log, newest first (who did what to which study, when)",
            responses={403: {"description": "not an admin"}})
def audit_api(request: Request, principal: Principal = Depends(api_principal), db: Session = Depends(db_session),
              actor: str | None = Query(None, max_length=64, description="one user's actions"),
              study: int | None = Query(None, ge=1, le=MAX_ID, description="one study's lines"),
              action: ActionName | None = Query(None, description="one action"),
              date_from: date | None = Query(None, alias="from", description="on or after (UTC)"),
              date_to: date | None = Query(None, alias="to", description="on or before (UTC)"),
              page: int = Query(1, ge=1, le=MAX_PAGE), per_page: int = Query(50, ge=1, le=500)):
    f = audit.AuditFilter(actor, study, action, date_from, date_to, page, per_page)
    lines, total = _read(request, principal, db, f)
    return {"items": [audit.as_dict(line) for line in lines], "page": page, "per_page": per_page, "total": total,
            "pages": (total + per_page - 1) // per_page}


@router.get("/admin/audit", include_in_schema=False)
def audit_page(request: Request, principal: Principal = Depends(page_principal), db: Session = Depends(db_session),
               actor: str = "", study: str = "", action: str = "", date_from: str = Query("", alias="from"),
               date_to: str = Query("", alias="to"), page: int = Query(1, ge=1, le=MAX_PAGE)):
    errors = []

    def parsed(value: str, name: str, kind):
        try:
            return kind(value) if value else None
        except ValueError:
            errors.append(f"'{value[:40]}' is not a valid {name}")
            return None

    study_id = parsed(study, "study number", int)
    if study_id is not None and not 0 < study_id <= MAX_ID:
        errors.append(f"there is no study {study_id}")
        study_id = None
    f = audit.AuditFilter(actor=actor[:64] or None, study_id=study_id,
                          action=action if action in audit.ACTIONS else None,
                          date_from=parsed(date_from, "date (YYYY-MM-DD) for From", date.fromisoformat),
                          date_to=parsed(date_to, "date (YYYY-MM-DD) for To", date.fromisoformat), page=page)
    lines, total = _read(request, principal, db, f)
    query = {"actor": actor, "study": study, "action": action, "from": date_from, "to": date_to}
    pages = max(1, (total + f.per_page - 1) // f.per_page)
    links = {name: f"/admin/audit?{urlencode({**query, 'page': n})}" for name, n in (("prev", page - 1),
                                                                                     ("next", page + 1))
             if 1 <= n <= pages}
    return render(request, "audit.html", principal, status=400 if errors else 200, lines=lines, total=total,
                  page=page, pages=pages, links=links, filters=query, errors=errors, actions=audit.ACTIONS)


__all__ = ["router"]
