"""The result as a DICOM Structured Report (highdicom): a TID 1500 Measurement Report, as the IHE AI Results
profile has it, in a Comprehensive 3D SR.

One measurement group about the film (its SOP instance is the group's source image): the finding (pneumonia
present / absent, or indeterminate when the decision is REFER), the calibrated probability and the operating
threshold, the decision and the reasons for a REFER when the answer names them, the image-quality flags, and the
algorithm identification (model name, version and bundle digest). VerificationFlag UNVERIFIED: no person has
read it. Terms without a standard code use the private coding scheme ``99PNEUMOSCOPE``, declared in the object.
"""

from __future__ import annotations

import io

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from gateway.result_facts import NOT_FOR_DIAGNOSTIC_USE, ResultFacts

SCHEME = "99PNEUMOSCOPE"
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
LUNG = hd.sr.CodedConcept("39607008", "SCT", "Lung structure")
INDETERMINATE = hd.sr.CodedConcept("82334004", "SCT", "Indeterminate")
PROBABILITY = hd.sr.CodedConcept("P-PROB", SCHEME, "Calibrated probability of pneumonia")
THRESHOLD = hd.sr.CodedConcept("P-THR", SCHEME, "Operating threshold")
OOD_SCORE = hd.sr.CodedConcept("P-OOD", SCHEME, "Out-of-distribution score")
DECISION = hd.sr.CodedConcept("P-DEC", SCHEME, "Automated decision")
REFER_REASON = hd.sr.CodedConcept("P-REFER", SCHEME, "Reason for referral")
QUALITY_FLAG = hd.sr.CodedConcept("P-QUAL", SCHEME, "Image quality flag")
INTENDED_USE = hd.sr.CodedConcept("P-USE", SCHEME, "Within intended use")
SERIES_NUMBER = 9901
SERIES_DESCRIPTION = f"pneumoscope AI result - {NOT_FOR_DIAGNOSTIC_USE}"


def _term(value: str) -> hd.sr.CodedConcept:
    """A term of the private scheme: the value is its code (at most 16 characters), its words the meaning."""
    return hd.sr.CodedConcept(value.upper()[:16], SCHEME, value.replace("_", " ")[:64])


def _finding_value(facts: ResultFacts) -> hd.sr.CodedConcept:
    return {"PNEUMONIA": codes.SCT.Present, "NORMAL": codes.SCT.Absent}.get(facts.finding, INDETERMINATE)


def build_sr(original: Dataset, facts: ResultFacts, series_instance_uid: str, sop_instance_uid: str,
             manufacturer: str, device_uid: str) -> bytes:
    """The SR's DICOM file (Part 10) for the film ``original`` (its kept patient and study modules and UIDs)."""
    evaluations = [hd.sr.QualitativeEvaluation(PNEUMONIA, _finding_value(facts))]
    if facts.decision:
        evaluations.append(hd.sr.QualitativeEvaluation(DECISION, _term(facts.decision)))
    evaluations += [hd.sr.QualitativeEvaluation(REFER_REASON, _term(r)) for r in facts.refer_reasons]
    if facts.in_intended_use is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(
            INTENDED_USE, codes.SCT.Yes if facts.in_intended_use else codes.SCT.No))
    evaluations += [hd.sr.QualitativeEvaluation(QUALITY_FLAG, _term(f)) for f in facts.quality_flags]
    no_units = codes.UCUM.NoUnits
    measurements = [hd.sr.Measurement(PROBABILITY, facts.probability, no_units),
                    hd.sr.Measurement(THRESHOLD, facts.threshold, no_units)]
    if facts.ood_score is not None:
        measurements.append(hd.sr.Measurement(OOD_SCORE, facts.ood_score, no_units))
    parameters = [f"sha256:{facts.model_sha256}"] if facts.model_sha256 else None
    algorithm = hd.sr.AlgorithmIdentification(name=facts.model_name, version=facts.model_version,
                                              parameters=parameters, manufacturer=manufacturer)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="pneumonia finding"),
        finding_type=PNEUMONIA, algorithm_id=algorithm, finding_sites=[hd.sr.FindingSite(LUNG)],
        measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(original.SOPClassUID, original.SOPInstanceUID)])
    device = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid, name=manufacturer, manufacturer_name=manufacturer, model_name=facts.model_name))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=CHEST_XRAY, imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[original], content=report, series_instance_uid=series_instance_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid, instance_number=1, manufacturer=manufacturer, is_complete=True,
        is_final=False, is_verified=False, series_description=SERIES_DESCRIPTION,
        content_date=facts.scored_at.date(), content_time=facts.scored_at.time().replace(microsecond=0),
        coding_schemes=[CodingSchemeIdentificationItem(SCHEME, name="pneumoscope terms",
                                                      responsible_organization="pneumoscope")],
        specific_character_set=original.get("SpecificCharacterSet"))
    return write(sr)


def write(dataset: Dataset) -> bytes:
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()
