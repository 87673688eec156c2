"""The printable report as a PDF (fpdf2): the image, the heatmap, the result, the model, the statement.

The HTML report page (``templates/report.html``) shows the same facts; both take their wording from
here so the print and the PDF never disagree.
"""

from __future__ import annotations

import io
from datetime import timezone

from webapp.models import Study

STATEMENT = ("This result is produced by software to support a radiologist's reading of the X-ray. It does not "
             "replace that reading and is not a diagnosis.")
DECISIONS = {"PNEUMONIA": "Pneumonia suspected", "NORMAL": "No pneumonia detected",
             "REFER": "Refer to a radiologist: no automatic decision"}
#: What REFER and "outside the intended use" mean, in plain words (the page and the PDF).
REFER_MEANING = ("REFER means the software makes no decision on this film: a radiologist must read it. It happens "
                 "when the probability is too close to the threshold to be reliable, or when the film lies outside "
                 "the model's intended use (a patient older than the age limit, or a film unlike those it was "
                 "trained on).")


def decision_text(study: Study) -> str:
    """The decision of the version that answered; a study scored before decisions existed shows its label."""
    return DECISIONS.get(study.decision or study.label or "", "No result")


def refer_texts(study: Study) -> list[str]:
    """Why the film was referred, one sentence per reason (empty unless the decision is REFER)."""
    return [str(r.get("text", r.get("code", ""))) for r in study.refer_reasons or [] if isinstance(r, dict)]


def model_text(study: Study) -> str:
    """The model, its training profile and, for a demonstration model, a warning."""
    use = study.model_intended_use or {}
    text = f"{study.model_name} version {study.model_version}"
    if use.get("profile"):
        text += f" (profile {use['profile']}"
        text += "; a demonstration model, not for clinical use)" if use.get("demonstration") else ")"
    return text


def when(moment) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def quality_warnings(study: Study) -> list[str]:
    """The transformer's image-quality flags (a list like ["blurred"], or a dict of booleans) as words."""
    flags = study.quality_flags
    if isinstance(flags, dict):
        flags = [name for name, value in flags.items() if value]
    return [str(flag).replace("_", " ") for flag in flags or []]


def facts(study: Study) -> list[tuple[str, str]]:
    rows = [("Study", f"#{study.id}"), ("Uploaded", when(study.created_at))]
    if study.status == "done":
        rows += [("Decision", decision_text(study))]
        rows += [("Reason for referral", text) for text in refer_texts(study)]
        if study.in_intended_use is not None:
            rows.append(("Intended use", "within the model's intended use" if study.in_intended_use
                         else "OUTSIDE the model's intended use"))
        rows += [("Probability of pneumonia", f"{study.probability * 100:.1f} %"),
                 ("Decision threshold", f"{study.threshold * 100:.1f} %")]
        if study.ood_score is not None:
            rows.append(("Out-of-distribution score", f"{study.ood_score:.2f} (above 1.00: unlike the training films)"))
        rows += [("Model", model_text(study)), ("Scored", when(study.scored_at))]
        if quality_warnings(study):
            rows.append(("Image quality warnings", ", ".join(quality_warnings(study))))
    else:
        rows.append(("Status", study.status))
    if study.feedback:
        rows.append(("Doctor's review", f"{study.feedback} ({study.feedback_label}) on {when(study.feedback_at)}"))
    if study.note:
        rows.append(("Note", study.note))
    return rows


def _jpeg(png_or_jpeg: bytes, max_side: int = 1200) -> io.BytesIO:
    """A modest JPEG for the PDF (a full-resolution PNG would make a 20 MB report)."""
    from PIL import Image

    with Image.open(io.BytesIO(png_or_jpeg)) as image:
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image.copy()
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=88)
    out.seek(0)
    return out


def render_pdf(study: Study, image: bytes, heatmap: bytes | None) -> bytes:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.set_title(f"pneumoscope study {study.id}")
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, "Chest X-ray: pneumonia screening report", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 10)
    for label, value in facts(study):
        pdf.set_font("Helvetica", "B", 10)
        pdf.cell(55, 6, label)
        pdf.set_font("Helvetica", "", 10)
        pdf.multi_cell(0, 6, value.encode("latin-1", "replace").decode("latin-1"), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    width = (pdf.w - pdf.l_margin - pdf.r_margin - 6) / 2
    top = pdf.get_y()
    pdf.set_font("Helvetica", "B", 10)
    pdf.cell(width, 6, "X-ray")
    pdf.cell(6, 6, "")
    pdf.cell(width, 6, "Heatmap (regions that drove the result)" if heatmap else "", new_x="LMARGIN", new_y="NEXT")
    info = pdf.image(_jpeg(image), x=pdf.l_margin, y=top + 7, w=width)
    bottom = top + 7 + info.rendered_height
    if heatmap:
        info = pdf.image(_jpeg(heatmap), x=pdf.l_margin + width + 6, y=top + 7, w=width)
        bottom = max(bottom, top + 7 + info.rendered_height)
    pdf.set_y(bottom + 6)
    pdf.set_font("Helvetica", "B", 11)
    pdf.multi_cell(0, 6, STATEMENT, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())
