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

from webapp.dependencies import Principal, check_csrf, client_address, ctx, db_session, page_principal
from webapp.errors import AppError
from webapp.models import DECISIONS, LABELS
from webapp import heatmap, report, report_versions
from webapp.models import Study
from webapp.report import STATEMENT, decision_text, quality_warnings, when
from webapp.routers.studies_api import accept_upload, give_feedback, identity_from_form, owned_study, \
    read_study, read_upload_form
from webapp.studies import MAX_PAGE, SORTS, StudyConflict, StudyFilter
from webapp.uploads import UploadRejected

router = APIRouter(include_in_schema=False)


def render(request: Request, template: str, principal: Principal, status: int = 200, **values):
    settings = ctx(request).settings
    values.update(user=principal.user, csrf_token=principal.csrf_token, labels=LABELS, when=when, statement=STATEMENT,
                  decision_text=decision_text, quality_warnings=quality_warnings, max_upload_mb=round(settings.max_upload_bytes / 1024 / 1024))
    return ctx(request).templates.TemplateResponse(request, template, values, status_code=status)


def worklist_rows(request: Request, db: Session, studies: list[Study]) -> list[dict]:
    """Each study with its decrypted patient block and its report's newest version, for the worklist table."""
    service = ctx(request).service
    reports = report_versions.latest_of(db, [s.id for s in studies])
    return [{"study": s, "identity": service.identity_of(s), "report": reports.get(s.id)} for s in studies]


def _recent(request: Request, principal: Principal, db: Session):
    rows, _ = ctx(request).service.search(db, principal.user, StudyFilter(per_page=5))
    return worklist_rows(request, db, rows)


@router.get("/")
def home(request: Request, principal: Principal = Depends(page_principal), db: Session = Depends(db_session)):
    return render(request, "upload.html", principal, recent=_recent(request, principal, db))


@router.post("/studies")
async def upload_form(request: Request, principal: Principal = Depends(page_principal),
                      db: Session = Depends(db_session)):
    try:
        data, content_type, filename, form = await read_upload_form(request)
        check_csrf(principal, form.get("csrf_token"))
        scoring = await accept_upload(request, principal, data, content_type, filename, form.get("note"),
                                      identity_from_form(form))
    except (UploadRejected, AppError) as exc:
        if getattr(exc, "code", "") == "csrf":
            raise
        return render(request, "upload.html", principal, status=exc.status, error=str(exc),
                      recent=_recent(request, principal, db))
    return RedirectResponse(f"/studies/{scoring.study.id}", status_code=303)


@router.get("/studies")
def studies(request: Request, principal: Principal = Depends(page_principal), db: Session = Depends(db_session),
            date_from: str = Query("", alias="from"), date_to: str = Query("", alias="to"), label: str = "",
            status: str = "", feedback: str = "", q: str = "", page: int = Query(1, ge=1, le=MAX_PAGE),
            sort: str = "suspicion", decision: str = ""):
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
                    page=page, per_page=20, sort=sort if sort in SORTS else "suspicion",
                    decision=decision if decision in DECISIONS else None)
    rows, total = ctx(request).service.search(db, principal.user, f)
    query = {"from": date_from, "to": date_to, "label": label, "status": status, "feedback": feedback, "q": q,
             "sort": f.sort, "decision": decision}
    pages = max(1, (total + f.per_page - 1) // f.per_page)
    links = {name: f"/studies?{urlencode({**query, 'page': n})}" for name, n in (("prev", page - 1), ("next", page + 1))
             if 1 <= n <= pages}
    return render(request, "studies.html", principal, status=400 if errors else 200,
                  rows=worklist_rows(request, db, rows), total=total,
                  page=page, pages=pages, links=links, filters=query, errors=errors)


def reading_context(request: Request, db: Session, study: Study) -> dict:
    """What the study and report pages show beside the study: the patient block, the report's newest version and
    the result's meaning in words (webapp.report)."""
    identity = ctx(request).service.identity_of(study)
    latest = report_versions.latest(db, study)
    return {"study": study, "identity": identity, "patient": report.patient_rows(identity), "report": latest,
            "view_text": report.view_text(identity.get("view")),
            "view_choices": report.view_choices(identity.get("view")),
            "sign_off": report.sign_off_text(latest), "why_refer": report.why_refer(study),
            "refer_meaning": report.REFER_MEANING, "outside_meaning": report.OUTSIDE_MEANING,
            "band": report.refer_band(study), "threshold_text": report.threshold_explanation(study),
            "profile": report.model_profile(study), "demonstration": report.is_demonstration(study),
            "demonstration_text": report.DEMONSTRATION, "heldout": report.heldout_rows(study),
            "advice": report.quality_advice(study), "lung_share": report.lung_share_text(study),
            "cutoff": heatmap.DEFAULT_CUTOFF}


@router.get("/studies/{study_id}")
def study_page(study_id: int, request: Request, saved: int = 0, principal: Principal = Depends(page_principal),
               db: Session = Depends(db_session)):
    study = read_study(request, principal, db, study_id, "page")
    return render(request, "study.html", principal, saved=bool(saved), **reading_context(request, db, study))


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
        return render(request, "study.html", principal, status=exc.status, feedback_error=str(exc),
                      **reading_context(request, db, study))
    return RedirectResponse(f"/studies/{study_id}?saved=1#review", status_code=303)


def _report_page(request: Request, principal: Principal, db: Session, study: Study, status: int = 200, **extra):
    context = reading_context(request, db, study)
    latest = context["report"]
    signed_patient = None
    if latest is not None and latest.state == "signed":
        signed_patient = ctx(request).service.cipher.decrypt(latest.patient) if latest.patient else {}
    return render(request, "report.html", principal, status=status, **context,
                  editable=study.status == "done" and (latest is None or latest.state == "draft"),
                  patient_signed=report.patient_rows(signed_patient), finding=report.finding_rows(study)[2:],
                  versions=report_versions.versions(db, study), **extra)


@router.get("/studies/{study_id}/report")
def report_page(study_id: int, request: Request, saved: str = "", principal: Principal = Depends(page_principal),
                db: Session = Depends(db_session)):
    study = read_study(request, principal, db, study_id, "report")
    messages = {"draft": "The draft was saved.",  # a signed report says so in its own banner
                "correction": "A new version was started to correct the signed report."}
    return _report_page(request, principal, db, study, report_saved=messages.get(saved))


@router.post("/studies/{study_id}/report")
def report_form(study_id: int, request: Request, action: str = Form(""), impression: str = Form(""),
                reason: str = Form(""), patient_ref: str = Form(""), accession: str = Form(""), view: str = Form(""),
                clinical_question: str = Form(""), csrf_token: str = Form(""),
                principal: Principal = Depends(page_principal), db: Session = Depends(db_session)):
    """Save the draft (impression and patient block), sign it, or start a correction of the signed version."""
    check_csrf(principal, csrf_token)
    study = owned_study(request, principal, db, study_id)
    service = ctx(request).service
    try:
        if action in ("save", "sign"):
            if not report_versions.identity_editable(db, study):
                raise StudyConflict("the report is signed: start a correction to change it")
            service.set_identity(study, {"patient_ref": patient_ref, "accession": accession, "view": view,
                                         "clinical_question": clinical_question})
            report_versions.save_draft(db, principal.user, study, impression)
            if action == "sign":
                report_versions.sign(db, principal.user, study, client_address(request))
        elif action == "correct":
            report_versions.correct(db, principal.user, study, reason, client_address(request))
        else:
            raise ValueError("choose save, sign or correct")
    except (StudyConflict, ValueError) as exc:
        db.rollback()
        study = owned_study(request, principal, db, study_id)
        return _report_page(request, principal, db, study, status=409 if isinstance(exc, StudyConflict) else 422,
                            report_error=str(exc))
    db.commit()
    done = {"save": "draft", "sign": "signed", "correct": "correction"}[action]
    return RedirectResponse(f"/studies/{study_id}/report?saved={done}", status_code=303)
