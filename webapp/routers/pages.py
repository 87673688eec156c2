"""The doctor's pages: upload, studies (search), one study (image, heatmap, result, review), report.

Server-rendered with Jinja2; ``static/app.js`` adds drag-and-drop, an upload without page reload, the
live update of a pending study and the heatmap controls. Everything also works without JavaScript.
"""

from __future__ import annotations

from datetime import date
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse
from sqlalchemy.orm import Session

from webapp.dependencies import Principal, check_csrf, ctx, db_session, page_principal
from webapp.errors import AppError
from webapp.models import LABELS
from webapp.report import REFER_MEANING, STATEMENT, decision_text, facts, model_text, quality_warnings, refer_texts, when
from webapp.routers.studies_api import accept_upload, give_feedback, owned_study, read_upload_form
from webapp.studies import StudyFilter
from webapp.uploads import UploadRejected

router = APIRouter(include_in_schema=False)


def render(request: Request, template: str, principal: Principal, status: int = 200, **values):
    settings = ctx(request).settings
    values.update(user=principal.user, csrf_token=principal.csrf_token, labels=LABELS, when=when, statement=STATEMENT,
                  decision_text=decision_text, quality_warnings=quality_warnings, refer_texts=refer_texts,
                  model_text=model_text, refer_meaning=REFER_MEANING, max_upload_mb=round(settings.max_upload_bytes / 1024 / 1024))
    return ctx(request).templates.TemplateResponse(request, template, values, status_code=status)


def _recent(request: Request, principal: Principal, db: Session):
    rows, _ = ctx(request).service.search(db, principal.user, StudyFilter(per_page=5))
    return rows


@router.get("/")
def home(request: Request, principal: Principal = Depends(page_principal), db: Session = Depends(db_session)):
    return render(request, "upload.html", principal, recent=_recent(request, principal, db))


@router.post("/studies")
async def upload_form(request: Request, principal: Principal = Depends(page_principal),
                      db: Session = Depends(db_session)):
    try:
        data, content_type, filename, form = await read_upload_form(request)
        check_csrf(principal, form.get("csrf_token"))
        scoring = await accept_upload(request, principal, data, content_type, filename, form.get("note"))
    except (UploadRejected, AppError) as exc:
        if getattr(exc, "code", "") == "csrf":
            raise
        return render(request, "upload.html", principal, status=exc.status, error=str(exc),
                      recent=_recent(request, principal, db))
    return RedirectResponse(f"/studies/{scoring.study.id}", status_code=303)


@router.get("/studies")
def studies(request: Request, principal: Principal = Depends(page_principal), db: Session = Depends(db_session),
            date_from: str = Query("", alias="from"), date_to: str = Query("", alias="to"), label: str = "",
            status: str = "", feedback: str = "", q: str = "", page: int = Query(1, ge=1)):
    errors = []

    def as_date(value: str, name: str) -> date | None:
        try:
            return date.fromisoformat(value) if value else None
        except ValueError:
            errors.append(f"'{value}' is not a date (YYYY-MM-DD) for {name}")
            return None

    f = StudyFilter(status=status if status in ("pending", "done", "rejected") else None,
                    label=label if label in LABELS else None,
                    feedback=feedback if feedback in ("confirmed", "corrected", "none") else None,
                    date_from=as_date(date_from, "From"), date_to=as_date(date_to, "To"), q=q[:200] or None,
                    page=page, per_page=20)
    rows, total = ctx(request).service.search(db, principal.user, f)
    query = {"from": date_from, "to": date_to, "label": label, "status": status, "feedback": feedback, "q": q}
    pages = max(1, (total + f.per_page - 1) // f.per_page)
    links = {name: f"/studies?{urlencode({**query, 'page': n})}" for name, n in (("prev", page - 1), ("next", page + 1))
             if 1 <= n <= pages}
    return render(request, "studies.html", principal, status=400 if errors else 200, studies=rows, total=total,
                  page=page, pages=pages, links=links, filters=query, errors=errors)


@router.get("/studies/{study_id}")
def study_page(study_id: int, request: Request, saved: int = 0, principal: Principal = Depends(page_principal),
               db: Session = Depends(db_session)):
    study = owned_study(request, principal, db, study_id)
    return render(request, "study.html", principal, study=study, saved=bool(saved))


@router.post("/studies/{study_id}/feedback")
def feedback_form(study_id: int, request: Request, verdict: str = Form(""), label: str = Form(""),
                  note: str = Form(""), csrf_token: str = Form(""), principal: Principal = Depends(page_principal),
                  db: Session = Depends(db_session)):
    check_csrf(principal, csrf_token)
    try:
        give_feedback(request, principal, db, study_id, verdict, label or None, note)
    except AppError as exc:
        if exc.status == 404:
            raise
        db.rollback()
        study = owned_study(request, principal, db, study_id)
        return render(request, "study.html", principal, status=exc.status, study=study, feedback_error=str(exc))
    return RedirectResponse(f"/studies/{study_id}?saved=1#review", status_code=303)


@router.get("/studies/{study_id}/report")
def report_page(study_id: int, request: Request, principal: Principal = Depends(page_principal),
                db: Session = Depends(db_session)):
    study = owned_study(request, principal, db, study_id)
    return render(request, "report.html", principal, study=study, facts=facts(study))
