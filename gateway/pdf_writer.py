"""The printable report as an Encapsulated PDF (PS3.3 A.45.1): the web app's own PDF (``webapp.report``, with its
images at most ``REPORT_IMAGE_SIDE`` px), with the original's patient and study modules around it, so that the
PACS files it in the film's study.

The PDF itself names no patient (it shows the web app's study number); the DICOM header around it does.
"""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

from gateway.result_facts import NOT_FOR_DIAGNOSTIC_USE, ResultFacts
from gateway.sr_writer import write

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
#: Longest side of the film and of the heatmap over it in the report sent to the PACS: a printed A4 page shows
#: them about 9 cm wide, so 1,024 px is 280 dpi; the film itself is in the PACS at full resolution.
REPORT_IMAGE_SIDE = 1024
SERIES_NUMBER = 9903
SERIES_DESCRIPTION = f"pneumoscope report - {NOT_FOR_DIAGNOSTIC_USE}"
#: Patient and General Study module attributes copied from the original (Type 2 ones are written empty if absent).
PATIENT_AND_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                     "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                     "AccessionNumber", "StudyDescription")
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


def build_encapsulated_pdf(original: Dataset, facts: ResultFacts, pdf: bytes, series_instance_uid: str,
                           sop_instance_uid: str, manufacturer: str) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if "SpecificCharacterSet" in original:
        ds.SpecificCharacterSet = original.SpecificCharacterSet
    for name in PATIENT_AND_STUDY:
        if name in original:
            ds[name] = original[name]
        elif name in TYPE_2:
            setattr(ds, name, "")
    date, time = facts.scored_at.strftime("%Y%m%d"), facts.scored_at.strftime("%H%M%S")
    # Encapsulated Document Series, General Equipment, SC Equipment
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "DOC", series_instance_uid, SERIES_NUMBER
    ds.SeriesDescription = SERIES_DESCRIPTION
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.Manufacturer = manufacturer
    ds.ConversionType = "WSD"  # workstation: made by software
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = date, time
    ds.AcquisitionDateTime = date + time
    ds.BurnedInAnnotation = "YES"  # the report's text is in the document itself
    ds.DocumentTitle = f"Chest X-ray pneumonia screening report ({NOT_FOR_DIAGNOSTIC_USE})"[:64]
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")  # OB: even length
    ds.EncapsulatedDocumentLength = len(pdf)
    # SOP Common
    ds.SOPClassUID, ds.SOPInstanceUID = ENCAPSULATED_PDF_STORAGE, sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    return write(ds)
