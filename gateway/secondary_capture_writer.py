"""The heatmap over the film as a Secondary Capture image (highdicom ``SCImage``), so that any viewer shows it.

The picture is the transformer's own heatmap rendering (the class-activation map over the film it decoded, at
most 512 px), with the headline and "NOT FOR DIAGNOSTIC USE" burned in along the top: a viewer that hides every
header still shows what the image is. ``BurnedInAnnotation`` says so.
"""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from gateway.result_facts import NOT_FOR_DIAGNOSTIC_USE, ResultFacts
from gateway.sr_writer import write

SERIES_NUMBER = 9902
SERIES_DESCRIPTION = f"pneumoscope heatmap - {NOT_FOR_DIAGNOSTIC_USE}"
#: The conventional display of a chest film (rows toward the patient's left, columns toward the feet), used when
#: the original does not say.
DEFAULT_ORIENTATION = ("L", "F")


def caption(facts: ResultFacts) -> list[str]:
    """The two lines burned in: what the image is, and the served decision (never the label alone: a REFER says
    refer, whatever side of the threshold the probability fell)."""
    return [f"{NOT_FOR_DIAGNOSTIC_USE} - pneumoscope {facts.model_name} v{facts.model_version}",
            f"{facts.headline()}: probability {facts.probability * 100:.1f}% (threshold {facts.threshold * 100:.1f}%)"]


def annotated(heatmap_png: bytes, facts: ResultFacts) -> np.ndarray:
    """The heatmap as RGB uint8 with two lines of text burned in over a dark band at the top."""
    with Image.open(io.BytesIO(heatmap_png)) as image:
        picture = image.convert("RGB")
    if min(picture.size) < 256:  # room for the text
        scale = 256 / min(picture.size)
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(picture)
    size = max(10, picture.width // 40)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    lines = caption(facts)
    band = int(size * 2.9)
    draw.rectangle((0, 0, picture.width, band), fill=(0, 0, 0))
    for i, line in enumerate(lines):
        draw.text((size // 2, size // 3 + i * int(size * 1.3)), line, fill=(255, 255, 255), font=font)
    return np.asarray(picture, dtype=np.uint8)


def build_secondary_capture(original: Dataset, facts: ResultFacts, heatmap_png: bytes, series_instance_uid: str,
                            sop_instance_uid: str, manufacturer: str) -> bytes:
    orientation = tuple(str(v) for v in original.get("PatientOrientation") or ()) or DEFAULT_ORIENTATION
    if len(orientation) != 2:
        orientation = DEFAULT_ORIENTATION
    laterality = original.get("Laterality") or None
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=original, pixel_array=annotated(heatmap_png, facts), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_instance_uid,
        series_number=SERIES_NUMBER, sop_instance_uid=sop_instance_uid, instance_number=1,
        manufacturer=manufacturer, patient_orientation=orientation, laterality=laterality,
        series_description=SERIES_DESCRIPTION, content_date=facts.scored_at.date(),
        content_time=facts.scored_at.time().replace(microsecond=0))
    if "Laterality" not in sc:
        sc.Laterality = ""  # General Series, type 2C: a chest is not a paired structure, so known and empty
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = NOT_FOR_DIAGNOSTIC_USE
    sc.DerivationDescription = "Class-activation heatmap of the pneumonia model over the film"
    if "ImageLaterality" in original:
        sc.ImageLaterality = original.ImageLaterality
    return write(sc)
