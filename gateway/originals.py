"""What a result must repeat from the original film to land in its study: the patient and study modules and the
film's UIDs, kept as DICOM JSON inside one Fernet token (``Study.pacs_original``) until every result is sent.

Nothing else of the original is kept: the stored image is the de-identified copy, as for uploads.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

#: Patient module (PS3.3 C.7.1.1, the attributes a result repeats), General Study module (C.7.2.1), the film's
#: identity (for the SR's evidence and the results' references), and the character set their names are written in.
KEPT = ("SpecificCharacterSet",
        "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
        "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
        "StudyDescription",
        "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "Modality", "PatientOrientation", "Laterality",
        "ImageLaterality")
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


class MissingIdentity(ValueError):
    """The object lacks a UID a result needs to find its study."""


def extract(header: Dataset) -> dict:
    """The kept attributes of ``header`` as DICOM JSON (a dict)."""
    missing = [name for name in REQUIRED if not str(header.get(name, "") or "").strip()]
    if missing:
        raise MissingIdentity(f"the object has no {', '.join(missing)}")
    kept = Dataset()
    for name in KEPT:
        if name in header:
            kept[name] = header[name]
    return kept.to_json_dict()


def restore(json_dict: dict) -> Dataset:
    """The kept attributes as a data set: the 'evidence' the result writers copy the patient and study from."""
    return Dataset.from_json(json_dict)
