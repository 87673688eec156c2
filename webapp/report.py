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
DECISIONS = {"PNEUMONIA": "Pneumonia suspected", "NORMAL": "No pneumonia detected"}


def decision_text(study: Study) -> str:
    return DECISIONS.get(study.label or "", "No result")


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
        rows += [("Decision", decision_text(study)),
                 ("Probability of pneumonia", f"{study.probability * 100:.1f} %"),
                 ("Decision threshold", f"{study.threshold * 100:.1f} %"),
                 ("Model", f"{study.model_name} version {study.model_version}"),
                 ("Scored", when(study.scored_at))]
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
