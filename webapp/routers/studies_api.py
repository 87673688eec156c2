"""The JSON API for studies (``/api/studies``): upload, list, read, image, heatmap, report, feedback.

Sign in with ``Authorization: Bearer <token>`` (or the page's session cookie plus the ``X-CSRF-Token``
header for writes). A study of another user answers 404, like one that does not exist.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import date
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from webapp import audit
from webapp.dependencies import Principal, api_principal, client_address, ctx, db_session
from webapp.errors import AppError, Conflict, NotFound
from webapp.metrics import UPLOADS
from webapp.models import FORMATS, VIEWS, Study
from webapp import report_versions
from webapp.storage import StorageError
from webapp.studies import (IDENTITY_FIELDS, MAX_PAGE, VIEW_DESCRIPTION, Scoring, StudyConflict, StudyFilter,
                             StudyNotFound, clean_identity, clean_note, pacs_summary, study_json)
from webapp.uploads import UploadRejected, check_upload

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/studies", tags=["studies"])

#: Room for the multipart envelope and the note beside the file in the streamed body limit.
FORM_OVERHEAD_BYTES = 64 * 1024


class FeedbackIn(BaseModel):
    verdict: Literal["confirmed", "corrected"] = Field(description="agree with the model, or correct it")
    label: Literal["NORMAL", "PNEUMONIA"] | None = Field(None, description="the right label (needed to correct)")
    note: str | None = Field(None, max_length=2000, description="replaces the study's note when given")


class StudyPage(BaseModel):
    items: list[dict]
    page: int
    per_page: int
    total: int
    pages: int


# -- upload (shared with the HTML form) ------------------------------------------------------------

def _too_large(limit: int) -> UploadRejected:
    return UploadRejected("too_large", f"the file is larger than the limit of {limit / 1024 / 1024:.0f} MB", 413)


async def read_upload_form(request: Request):
    """Parse the multipart body, counting bytes as they arrive: an oversized upload is refused after at
    most limit + envelope bytes, never read whole. Returns (file bytes, content type, file name, form)."""
    try:
        return await _read_upload_form(request)
    except UploadRejected as exc:
        UPLOADS.labels(exc.code).inc()
        raise


async def _read_upload_form(request: Request):
    limit = ctx(request).settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + FORM_OVERHEAD_BYTES:
        raise _too_large(limit)
    received = 0

    async def counting_receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit + FORM_OVERHEAD_BYTES:
                raise _too_large(limit)
        return message

    limited = Request(request.scope, counting_receive)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UploadRejected("invalid_request", "send the image as multipart/form-data with the field 'file'", 415)
    form = await limited.form(max_files=1, max_fields=8 + len(IDENTITY_FIELDS))
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise UploadRejected("invalid_request", "no file: send the image in the multipart field 'file'")
    data = await upload.read()
    await upload.close()
    if len(data) > limit:
        raise _too_large(limit)
    return data, upload.content_type or "", upload.filename or "", form


def identity_from_form(form) -> dict:
    """The patient fields of an upload form (all optional)."""
    return {key: form.get(key) for key in IDENTITY_FIELDS if isinstance(form.get(key), str)}


async def accept_upload(request: Request, principal: Principal, data: bytes, content_type: str, filename: str,
                        note: str | None, identity: dict | None = None):
    """Check, store, score inline (bounded wait). Returns the Scoring; raises for refused files. ``identity``:
    the patient fields the doctor typed (stored encrypted, never logged)."""
    context = ctx(request)
    try:
        note = clean_note(note)
        identity = clean_identity(identity)
        checked = await asyncio.to_thread(check_upload, data, content_type, filename,
                                          context.settings.deidentify_dicom,
                                          context.settings.strip_image_metadata)
    except UploadRejected as exc:
        UPLOADS.labels(exc.code).inc()
        raise
    except ValueError as exc:
        UPLOADS.labels("invalid_request").inc()
        raise AppError(str(exc)) from None
    service = context.service
    study = await service.create(principal.user, checked, note, identity, client=client_address(request))
    try:
        scoring = await service.score(study.id, context.settings.inline_wait_s, discard_rejected=True,
                                      data=checked.data)
    except (DBAPIError, StorageError) as exc:
        # Stored whole and committed: the study is not lost, only its result waits. Its lease runs out and the
        # retry worker scores it; answering 503 would make the client upload it a second time.
        log.warning("study %d stored; its result waits for the retry worker (%s)", study.id,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        scoring = Scoring(study, "pending", "stored; the result follows")
    if scoring.outcome == "rejected":
        UPLOADS.labels("rejected_by_model").inc()
        raise UploadRejected("rejected_by_model", f"the image was not accepted for analysis: {scoring.message}",
                             422)
    UPLOADS.labels(scoring.outcome).inc()
    return scoring


#: The upload's optional patient fields as OpenAPI describes them (stored encrypted; over the DICOM header's).
IDENTITY_SCHEMA = {name: {"type": "string", "maxLength": IDENTITY_FIELDS[name], **extra} for name, extra in {
    "patient_ref": {"description": "the hospital's patient reference"},
    "accession": {"description": "accession number of the examination"},
    "view": {"enum": ["", *VIEWS], "description": VIEW_DESCRIPTION},
    "clinical_question": {"description": "why the film was taken"}}.items()}
#: The upload's body as OpenAPI describes it (the route reads the stream itself, to count bytes as they arrive).
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary", "description": "a JPEG, PNG or DICOM chest X-ray"},
        "note": {"type": "string", "maxLength": 2000, "description": "for the doctor's own search; no PHI"},
        **IDENTITY_SCHEMA}}}}}}


@router.post("", status_code=201, summary="upload an X-ray (multipart field 'file'; optional 'note', 'patient_ref', "
                                          "'accession', 'view' (PA|AP|a non-frontal term), 'clinical_question')",
             openapi_extra=UPLOAD_BODY,
             responses={201: {"description": "stored and scored"},
                        202: {"description": "stored; the inference service is busy or down, so it is pending"},
                        413: {"description": "larger than the limit"}, 415: {"description": "not an image"},
                        422: {"description": "unreadable, no pixel data, or refused by the X-ray gate"}})
async def upload_study(request: Request, principal: Principal = Depends(api_principal)):
    data, content_type, filename, form = await read_upload_form(request)
    scoring = await accept_upload(request, principal, data, content_type, filename, form.get("note"),
                                  identity_from_form(form))
    status = 201 if scoring.outcome == "scored" else 202
    service = ctx(request).service
    return JSONResponse(study_json(scoring.study, identity=service.identity_of(scoring.study)), status_code=status,
                        headers={"location": f"/api/studies/{scoring.study.id}"})


# -- read ------------------------------------------------------------------------------------------

def owned_study(request: Request, principal: Principal, db: Session, study_id: int) -> Study:
    try:
        return ctx(request).service.get(db, principal.user, study_id)
    except StudyNotFound:
        raise NotFound(f"study {study_id} not found") from None


def read_study(request: Request, principal: Principal, db: Session, study_id: int, what: str) -> Study:
    """The study, for a read that the audit log records (``what``: page, result, image, heatmap, report)."""
    study = owned_study(request, principal, db, study_id)
    audit.record_view(db, principal.user, study.id, what, client_address(request))
    return study


@router.get("", response_model=StudyPage, summary="your studies, newest first or by suspicion (admins: everyone's)")
def list_studies(request: Request, principal: Principal = Depends(api_principal), db: Session = Depends(db_session),
                 status: Literal["pending", "done", "rejected"] | None = None,
                 label: Literal["NORMAL", "PNEUMONIA"] | None = Query(None, description="the model's decision"),
                 feedback: Literal["confirmed", "corrected", "none"] | None = None,
                 date_from: date | None = Query(None, alias="from", description="uploaded on or after (UTC)"),
                 date_to: date | None = Query(None, alias="to", description="uploaded on or before (UTC)"),
                 q: str | None = Query(None, max_length=200, description="text in the note"),
                 owner: str | None = Query(None, description="admins: one user's studies"),
                 page: int = Query(1, ge=1, le=MAX_PAGE), per_page: int = Query(20, ge=1, le=100),
                 sort: Literal["time", "suspicion"] = Query("time", description="time: newest first; suspicion: "
                                                            "REFER and PNEUMONIA first, then by probability"),
                 decision: Literal["PNEUMONIA", "NORMAL", "REFER"] | None = Query(None, description="the served "
                                                                                  "decision")):
    f = StudyFilter(status, label, feedback, date_from, date_to, q, owner, page, per_page, sort, decision)
    service = ctx(request).service
    rows, total = service.search(db, principal.user, f)
    reports = report_versions.latest_of(db, [s.id for s in rows])
    admin = principal.user.is_admin
    return {"items": [study_json(s, s.owner.username if admin else None, service.identity_of(s), reports.get(s.id))
                      for s in rows], "page": page,
            "per_page": per_page, "total": total, "pages": (total + per_page - 1) // per_page}


@router.get("/{study_id}", summary="one study with its result")
def get_study(study_id: int, request: Request, principal: Principal = Depends(api_principal),
              db: Session = Depends(db_session)):
    study = read_study(request, principal, db, study_id, "result")
    admin = principal.user.is_admin
    return study_json(study, study.owner.username if admin else None, ctx(request).service.identity_of(study),
                      report_versions.latest(db, study),
                      pacs_summary(study, ctx(request).settings.field_cipher()) if admin else None)


@router.get("/{study_id}/image", summary="the stored (de-identified) file, or with variant=display an image a "
                                         "browser shows (a PNG rendering for DICOM)")
def get_image(study_id: int, request: Request, variant: Literal["original", "display"] = "original",
              principal: Principal = Depends(api_principal), db: Session = Depends(db_session)):
    study = read_study(request, principal, db, study_id, "image")
    store = ctx(request).store
    if variant == "display" and study.has_preview:
        return Response(store.get(study.preview_key()), media_type="image/png")
    return Response(store.get(study.image_key()), media_type=FORMATS[study.image_format][1],
                    headers={"content-disposition": f'inline; filename="study-{study.id}.'
                                                    f'{FORMATS[study.image_format][0]}"'})


@router.get("/{study_id}/heatmap", summary="the heatmap over the X-ray (PNG)",
            responses={409: {"description": "no result yet"}})
def get_heatmap(study_id: int, request: Request, principal: Principal = Depends(api_principal),
                db: Session = Depends(db_session)):
    study = read_study(request, principal, db, study_id, "heatmap")
    if not study.has_heatmap:
        raise Conflict(f"study {study_id} has no heatmap (status: {study.status})")
    return Response(ctx(request).store.get(study.heatmap_key()), media_type="image/png")


@router.post("/{study_id}/feedback", summary="confirm or correct the finding, with an optional note")
def post_feedback(study_id: int, body: FeedbackIn, request: Request, principal: Principal = Depends(api_principal),
                  db: Session = Depends(db_session)):
    study = give_feedback(request, principal, db, study_id, body.verdict, body.label, body.note)
    return study_json(study)


def give_feedback(request: Request, principal: Principal, db: Session, study_id: int, verdict: str,
                  label: str | None, note: str | None) -> Study:
    try:
        study = ctx(request).service.give_feedback(db, principal.user, study_id, verdict, label, note)
        # verdict is one of the two review actions here: the service refused anything else
        audit.record(db, study.feedback, principal.user, study.id, client_address(request),
                     f"label {study.feedback_label}")
    except StudyNotFound:
        raise NotFound(f"study {study_id} not found") from None
    except StudyConflict as exc:
        raise Conflict(str(exc)) from None
    except ValueError as exc:
        raise AppError(str(exc), code="invalid_feedback") from None
    db.commit()
    return study


__all__ = ["router", "read_upload_form", "accept_upload", "owned_study", "read_study", "give_feedback"]
