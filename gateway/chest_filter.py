"""Which received objects are scored: frontal chest radiographs only (CR or DX, body part CHEST or empty, a view
that is not lateral, decubitus or oblique, one frame).

Everything else is acknowledged and left alone, counted by the reason (``ignored_<reason>``). Read from the header
alone: nothing here touches pixel data.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.dicom import header_view
from model.intended_use import view_reason

SCORED_MODALITIES = ("CR", "DX")
CHEST_BODY_PARTS = ("", "CHEST")


@dataclass(frozen=True)
class Verdict:
    score: bool
    reason: str = ""  # why not (a metric label: modality, body_part, view, multiframe)
    detail: str = ""  # one line for the log, no PHI


def classify(header) -> Verdict:
    """Decide from a header-only pydicom data set."""
    modality = str(header.get("Modality", "") or "").strip().upper()
    if modality not in SCORED_MODALITIES:
        return Verdict(False, "modality", f"modality {modality or 'missing'} is not CR or DX")
    body_part = str(header.get("BodyPartExamined", "") or "").strip().upper()
    if body_part not in CHEST_BODY_PARTS:
        return Verdict(False, "body_part", f"body part {body_part[:16]} is not CHEST")
    # A study's lateral film beside its frontal one: no version reads it (a header naming no view is scored)
    view = header_view(header)
    if view_reason(view) is not None:
        return Verdict(False, "view", f"view {view} is not frontal (PA or AP); acknowledged, not scored")
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 0
    if frames != 1:
        return Verdict(False, "multiframe", f"a multi-frame object ({header.get('NumberOfFrames')} frames) is not a "
                                            "chest radiograph the model reads; acknowledged, not scored")
    return Verdict(True)
