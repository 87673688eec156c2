"""The reading room's API: what the viewer draws (the CAM grid and lung mask, a DICOM film's 16-bit display
copy, worklist thumbnails), the patient block, and the report's versions (draft, sign-off, correction), plus the
PDF. Same rules as ``studies_api``: a bearer token or the session (+ CSRF header for writes); another user's
study answers 404. The audit log records what the viewer reads of a study (``viewed``: cam, overlay, pixels,
report versions; the worklist's thumbnails are the list's, not a study's reading), the PDF (``exported``),
sign-off (``signed``) and corrections (``corrected``).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from webapp import audit, heatmap, report_versions
from webapp.dependencies import Principal, api_principal, client_address, ctx, db_session
from webapp.errors import AppError, Conflict, NotFound
from webapp.models import Study, User
from webapp.report import study_pdf
from webapp.routers.studies_api import owned_study, read_study
from webapp.studies import VIEW_DESCRIPTION, StudyConflict, study_json
from webapp.uploads import thumbnail

router = APIRouter(prefix="/api/studies", tags=["reading"])


class PatientIn(BaseModel):
    patient_ref: str | None = Field(None, max_length=64, description="the hospital's patient reference")
    accession: str | None = Field(None, max_length=64, description="accession number of the examination")
    view: str | None = Field(None, description=VIEW_DESCRIPTION)
    clinical_question: str | None = Field(None, max_length=500, description="why the film was taken")


class DraftIn(BaseModel):
    impression: str = Field("", max_length=8000, description="the doctor's impression")
    patient: PatientIn | None = Field(None, description="replaces the patient block (only while not signed)")


class CorrectionIn(BaseModel):
    reason: str = Field(..., max_length=1000, description="why the signed report is corrected")


def _conflicts(action):
    """Run a report or identity change: a state conflict is 409, a bad value 422, both with the reason."""
    try:
        return action()
    except StudyConflict as exc:
        raise Conflict(str(exc)) from None
    except ValueError as exc:
        raise AppError(str(exc), status=422, code="invalid_report") from None


# -- what the viewer draws ----------------------------------------------------------------------------------

@router.get("/{study_id}/thumbnail", summary="a small PNG of the film for the worklist")
def get_thumbnail(study_id: int, request: Request, principal: Principal = Depends(api_principal),
                  db: Session = Depends(db_session)):
    study = owned_study(request, principal, db, study_id)
    store = ctx(request).store
    try:
        data = store.get(study.thumbnail_key())
    except FileNotFoundError:  # a study stored before thumbnails existed: made once, then kept
        data = thumbnail(store.get(study.shown_key()))
        if data is None:
            raise NotFound(f"study {study_id} has no image a thumbnail can be made of") from None
        store.put(study.thumbnail_key(), data)
    return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=3600"})


@router.get("/{study_id}/cam", summary="the class-activation map grid, the lung mask and the lung share",
            responses={409: {"description": "no result with a CAM"}})
def get_cam(study_id: int, request: Request, principal: Principal = Depends(api_principal),
            db: Session = Depends(db_session)):
    study = read_study(request, principal, db, study_id, "cam")
    if not study.cam:
        raise Conflict(f"study {study_id} has no class-activation map (status: {study.status})")
    served_mask = study.lung_mask is not None
    return {"cam": study.cam, "lung_mask": study.lung_mask if served_mask else heatmap.lung_prior_grid(),
            "lung_mask_source": heatmap.SOURCE_MODEL if served_mask else heatmap.SOURCE_PRIOR,
            "cam_lung_share": study.cam_lung_share, "lung_share_source": study.lung_share_source,
            "cutoff": heatmap.DEFAULT_CUTOFF, "colormap": heatmap.DEFAULT_COLORMAP,
            "extent": "the CAM covers the whole film (the model's input is the film squashed to a square)"}


@router.get("/{study_id}/overlay", summary="the film with the heatmap drawn over it as the viewer draws it (PNG: "
                                           "viridis, coloured from the default cut-off up)",
            responses={409: {"description": "no result with a heatmap"}})
def get_overlay(study_id: int, request: Request, principal: Principal = Depends(api_principal),
                db: Session = Depends(db_session)):
    study = read_study(request, principal, db, study_id, "overlay")
    store = ctx(request).store
    if study.cam:
        film = store.get(study.shown_key())
        return Response(heatmap.overlay_png(film, study.cam), media_type="image/png")
    if study.has_heatmap:  # a result from before the CAM was kept
        return Response(store.get(study.heatmap_key()), media_type="image/png")
    raise Conflict(f"study {study_id} has no heatmap (status: {study.status})")


@router.get("/{study_id}/pixels", summary="a DICOM film's 16-bit display copy: uint16 little-endian rows "
                                          "(gzip content-encoding); its description is the study's 'display'",
            responses={409: {"description": "not a DICOM study"}})
def get_pixels(study_id: int, request: Request, principal: Principal = Depends(api_principal),
               db: Session = Depends(db_session)):
    study = read_study(request, principal, db, study_id, "pixels")
    if not study.display:
        raise Conflict(f"study {study_id} has no 16-bit display copy (only DICOM films have one)")
    data = ctx(request).store.get(study.display16_key())
    return Response(data, media_type="application/octet-stream",
                    headers={"content-encoding": "gzip", "x-image-width": str(study.display["width"]),
                             "x-image-height": str(study.display["height"])})


# -- the patient block ----------------------------------------------------------------------------------------

@router.put("/{study_id}/patient", summary="set the patient block (stored encrypted; refused once signed)")
def put_patient(study_id: int, body: PatientIn, request: Request, principal: Principal = Depends(api_principal),
                db: Session = Depends(db_session)):
    study = owned_study(request, principal, db, study_id)
    _set_patient(request, db, study, body)
    db.commit()
    return _study(request, db, study)


def _set_patient(request: Request, db: Session, study: Study, body: PatientIn) -> None:
    def change():
        if not report_versions.identity_editable(db, study):
            raise StudyConflict("the report is signed: the patient block is part of it; start a correction first")
        ctx(request).service.set_identity(study, body.model_dump())

    _conflicts(change)


def _study(request: Request, db: Session, study: Study) -> dict:
    return study_json(study, None, ctx(request).service.identity_of(study), report_versions.latest(db, study))


# -- the report's versions ------------------------------------------------------------------------------------

def _versions_json(request: Request, db: Session, study: Study) -> dict:
    cipher = ctx(request).service.cipher
    return {"study": study.id, "versions": [report_versions.version_json(v, cipher.decrypt(v.patient) or {}
                                                                         if v.patient else None)
                                            for v in report_versions.versions(db, study)]}


@router.get("/{study_id}/report/versions", summary="every version of the report, oldest first")
def get_versions(study_id: int, request: Request, principal: Principal = Depends(api_principal),
                 db: Session = Depends(db_session)):
    return _versions_json(request, db, read_study(request, principal, db, study_id, "report versions"))


@router.put("/{study_id}/report/draft", summary="write the draft: impression (and the patient block)",
            responses={409: {"description": "no result yet, or the report is signed"}})
def put_draft(study_id: int, body: DraftIn, request: Request, principal: Principal = Depends(api_principal),
              db: Session = Depends(db_session)):
    study = owned_study(request, principal, db, study_id)
    if body.patient is not None:
        _set_patient(request, db, study, body.patient)
    _conflicts(lambda: report_versions.save_draft(db, principal.user, study, body.impression))
    db.commit()
    return _versions_json(request, db, study)


@router.post("/{study_id}/report/sign", summary="sign the draft: it becomes read-only",
             responses={409: {"description": "nothing to sign, or already signed"}})
def post_sign(study_id: int, request: Request, principal: Principal = Depends(api_principal),
              db: Session = Depends(db_session)):
    study = owned_study(request, principal, db, study_id)
    _conflicts(lambda: report_versions.sign(db, principal.user, study, client_address(request)))
    db.commit()
    return _versions_json(request, db, study)


@router.post("/{study_id}/report/corrections", status_code=201,
             summary="correct the signed report: a new draft version that names the reason",
             responses={409: {"description": "the report is not signed"}})
def post_correction(study_id: int, body: CorrectionIn, request: Request,
                    principal: Principal = Depends(api_principal), db: Session = Depends(db_session)):
    study = owned_study(request, principal, db, study_id)
    _conflicts(lambda: report_versions.correct(db, principal.user, study, body.reason, client_address(request)))
    db.commit()
    return _versions_json(request, db, study)


# -- the PDF --------------------------------------------------------------------------------------------------

async def report_pdf(request: Request, db: Session, user: User, study: Study,
                     version_number: int | None = None) -> Response:
    """The report as a PDF download: the newest version, or ``version_number``; ``user``'s export is audited."""
    versions = report_versions.versions(db, study)
    version = versions[-1] if versions else None
    if version_number is not None:
        version = next((v for v in versions if v.version == version_number), None)
        if version is None:
            raise NotFound(f"study {study.id} has no report version {version_number}")
    store = ctx(request).store
    cipher = ctx(request).service.cipher
    identity = cipher.decrypt(version.patient) if version is not None and version.patient else \
        ctx(request).service.identity_of(study)

    pdf = await asyncio.to_thread(study_pdf, study, store, identity, version)
    audit.record(db, "exported", user, study.id, client_address(request),
                 "report PDF" + (f" v{version.version}" if version is not None else ""))
    db.commit()
    name = f"pneumoscope-study-{study.id}" + (f"-v{version.version}" if version is not None else "") + ".pdf"
    return Response(pdf, media_type="application/pdf",
                    headers={"content-disposition": f'attachment; filename="{name}"'})


@router.get("/{study_id}/report", summary="the report as a PDF download (the newest version, or ?version=N)")
async def get_report(study_id: int, request: Request, version: int | None = Query(None, ge=1),
                     principal: Principal = Depends(api_principal), db: Session = Depends(db_session)):
    return await report_pdf(request, db, principal.user, owned_study(request, principal, db, study_id), version)


__all__ = ["router", "report_pdf"]
