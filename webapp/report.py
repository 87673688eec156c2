"""What a study's result means, in words, and the report as a PDF (fpdf2).

The study page, the HTML report and the PDF take their wording from here, so they never disagree: the
decision (PNEUMONIA, NORMAL or REFER) and why, what "outside the intended use" means, how the threshold and
the refer band were chosen, the model's profile and the held-out figures it was registered with, the image
quality warnings with what to do, the patient block, and the doctor's impression and sign-off.

The PDF embeds its fonts (DejaVu Sans, ``webapp/fonts``: the PDF core fonts are not embedded and some
viewers spaced them as "P neumonia"), fills one A4 page (film and heatmap as large as the text leaves room
for) and is served as a download.
"""

from __future__ import annotations

import io
from datetime import timezone
from pathlib import Path

from model.intended_use import NON_FRONTAL_VIEWS
from webapp.models import FRONTAL_VIEW_CHOICES, Study

STATEMENT = ("This result is produced by software to support a radiologist's reading of the X-ray. It does not "
             "replace that reading and is not a diagnosis.")
DECISIONS = {"PNEUMONIA": "Pneumonia suspected", "NORMAL": "No pneumonia detected",
             "REFER": "Refer: no finding from the model"}
REFER_MEANING = ("REFER means the model gives no finding for this film: a radiologist reads it without the model's "
                 "help. It happens when the probability falls in the indeterminate band, where the model's calls on "
                 "validation films were too often wrong to rely on, or when the film is outside the model's "
                 "intended use.")
OUTSIDE_MEANING = ("Outside the intended use means the film is unlike the films the model was trained and tested on "
                   "(for example an adult's film for a model made on children's, a lateral view, or another kind of "
                   "image). Its probability is shown but cannot be trusted.")
#: The out-of-distribution score above which the predictor finds a film outside the intended use: scores are the
#: detector's distance divided by its cut-off, fitted on validation films (model.ood, model.intended_use).
OOD_LIMIT = 1.0
DEMONSTRATION = ("Demonstration model: trained on small images to show how the system works. It is not validated "
                 "for patient care; do not use its findings clinically.")
PATIENT_LABELS = {"patient_ref": "Patient reference", "accession": "Accession number", "view": "View",
                  "clinical_question": "Clinical question"}
METRIC_NAMES = {"auc": "AUC", "roc_auc": "AUC", "sensitivity": "Sensitivity", "specificity": "Specificity",
                "accuracy": "Accuracy", "ppv": "PPV", "npv": "NPV", "coverage": "Decided (not referred)",
                "decided_sensitivity": "Sensitivity on decided films",
                "decided_specificity": "Specificity on decided films", "n": "Films", "images": "Films",
                "patients": "Patients", "brier": "Brier score", "ece": "Calibration error (ECE)"}
#: Metrics shown as percentages (the others as numbers).
RATES = {"sensitivity", "specificity", "accuracy", "ppv", "npv", "coverage", "decided_sensitivity",
         "decided_specificity"}
FONTS = Path(__file__).resolve().parent / "fonts"


def decision_text(study: Study) -> str:
    return DECISIONS.get(study.shown_decision() or "", "No result")


def when(moment) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if moment else "-"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


# -- what the result means ------------------------------------------------------------------------------

def refer_band(study: Study) -> tuple[float, float] | None:
    """The indeterminate band (low, high) the model was registered with, when the answer names it."""
    info = study.model_info or {}
    # an older server sends it beside the figures; model.intended_use puts it among the registered figures
    band = info.get("refer_band") or (info.get("registered") or {}).get("refer_band")
    try:
        if isinstance(band, dict):
            return float(band["low"]), float(band["high"])
        if isinstance(band, (list, tuple)) and len(band) == 2:
            return float(band[0]), float(band[1])
    except (KeyError, TypeError, ValueError):
        return None
    return None


def why_refer(study: Study) -> list[str]:
    """Why this film got REFER or was found outside the intended use, in words (empty when neither)."""
    reasons = [r.get("text") or r.get("code", "").replace("_", " ") for r in study.refer_reasons or []]
    if not reasons and study.shown_decision() == "REFER":
        band = refer_band(study)
        if study.in_intended_use is False:
            reasons.append("The film is outside the model's intended use.")
        elif band is not None and study.probability is not None and band[0] <= study.probability < band[1]:
            reasons.append(f"The probability, {percent(study.probability)}, lies in the indeterminate band "
                           f"{percent(band[0])} to {percent(band[1])}.")
        else:
            reasons.append("The model server did not say why.")
    return reasons


def threshold_explanation(study: Study) -> str:
    if study.threshold is None:
        return ""
    text = (f"The model calls pneumonia when its probability is at or above {percent(study.threshold)}: the "
            "operating threshold chosen on validation films, before the model was registered, to balance missed "
            "pneumonias against false alarms.")
    band = refer_band(study)
    if band is not None:
        text += (f" Between {percent(band[0])} and {percent(band[1])} it refers the film instead: on validation "
                 "films its calls in that band were too often wrong.")
    return text


def model_profile(study: Study) -> str | None:
    info = study.model_info or {}
    return info.get("profile") or info.get("model_profile")


def is_demonstration(study: Study) -> bool:
    info = study.model_info or {}
    return bool(info.get("demonstration")) or model_profile(study) == "demo"


def heldout_rows(study: Study) -> list[tuple[str, str]]:
    """The held-out figures the model was registered with, as (name, value) to show."""
    info = study.model_info or {}
    figures = info.get("heldout") or info.get("registered") or {}
    if not isinstance(figures, dict):
        return []
    rows = []
    for key, value in figures.items():
        base = key.removesuffix("_ci95")
        name = METRIC_NAMES.get(base, base.replace("_", " ").capitalize()) + (" (95 % CI)" if base != key else "")
        if isinstance(value, (bool, dict)) or value is None or key in ("split", "threshold"):
            continue  # the band is shown on its own; the threshold is the study's
        if isinstance(value, (int, float)):
            shown = percent(value) if key in RATES else (f"{value:,}" if isinstance(value, int) else f"{value:.3f}")
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            shown = f"{value[0]:.3f} to {value[1]:.3f}"  # a confidence interval
        else:
            shown = str(value)
        rows.append((name, shown))
    return rows


def lung_share_text(study: Study) -> str | None:
    if study.cam_lung_share is None:
        return None
    return f"{study.cam_lung_share * 100:.0f} % of the heatmap inside the lungs ({study.lung_share_source})"


def quality_advice(study: Study) -> list[dict]:
    """Each warning with what it means and what to do (``model.quality.ADVICE``); a flag this code does not know
    (from another model server) is shown by its name."""
    from model.quality import ADVICE, FLAG_TEXT

    flags = study.quality_flags
    if isinstance(flags, dict):
        flags = [name for name, value in flags.items() if value]
    out = []
    for flag in flags or []:
        if flag == FLAG_TEXT:
            continue  # a side marker or label, which older transformers reported as a warning: it is none
        what, todo = ADVICE.get(str(flag), (str(flag).replace("_", " ").capitalize() + ".", "Read with care."))
        out.append({"code": str(flag), "text": what, "action": todo})
    return out


def quality_warnings(study: Study) -> list[str]:
    """The warnings' names in words (the short form, for lists)."""
    return [item["code"].replace("_", " ") for item in quality_advice(study)]


def view_text(view: str | None) -> str:
    """A study's view in words: a non-frontal one says so ("LL (not frontal)"), since the model reads frontal films
    only and the result beside it is referred for that reason; "-" when unknown."""
    if not view:
        return "-"
    return f"{view} (not frontal)" if view in NON_FRONTAL_VIEWS else view


def view_choices(view: str | None) -> list[tuple[str, str]]:
    """The report form's View options (value, text): unknown, PA, AP, and the study's own view when its DICOM
    header named a non-frontal one. That one is offered so that it can be the selected option: without it the
    browser would post "unknown", and saving the draft would silently erase what the header said. The doctor may
    still choose PA, AP or unknown; other non-frontal terms come only from a header (or the API)."""
    choices = [("", "Unknown"), *((frontal, frontal) for frontal in FRONTAL_VIEW_CHOICES)]
    if view in NON_FRONTAL_VIEWS:
        choices.append((view, view_text(view)))
    return choices


def patient_rows(identity: dict | None) -> list[tuple[str, str]]:
    identity = identity or {}
    return [(label, view_text(identity.get(key)) if key == "view" else identity.get(key) or "-")
            for key, label in PATIENT_LABELS.items()]


def intended_use_text(study: Study) -> str:
    """Whether the film was within the model's intended use, with the out-of-distribution score and its limit,
    so that a printed report says how unlike the training films this film was (the study page shows both)."""
    if study.in_intended_use is None:
        text = "not checked by this model version"
    else:
        text = "within the model's intended use" if study.in_intended_use else "OUTSIDE the model's intended use"
    if study.ood_score is not None:
        text += (f" (out-of-distribution score {study.ood_score:.2f}; above {OOD_LIMIT:.2f}: unlike the "
                 "training films)")
    return text


def finding_rows(study: Study) -> list[tuple[str, str]]:
    rows = [("Study", f"#{study.id}"), ("Uploaded", when(study.created_at))]
    if study.status != "done":
        return rows + [("Status", study.status)]
    rows += [("AI finding", decision_text(study)), ("Probability of pneumonia", percent(study.probability)),
             ("Decision threshold", percent(study.threshold))]
    band = refer_band(study)
    if band is not None:
        rows.append(("Refer band", f"{percent(band[0])} to {percent(band[1])}"))
    reasons = why_refer(study)
    if reasons:
        rows.append(("Why referred" if study.shown_decision() == "REFER" else "Reasons given", " ".join(reasons)))
    if study.in_intended_use is not None or study.ood_score is not None:
        rows.append(("Intended use", intended_use_text(study)))
    model = f"{study.model_name} version {study.model_version}"
    if model_profile(study):
        model += f", profile {model_profile(study)}"
    rows.append(("Model", model + (" (demonstration)" if is_demonstration(study) else "")))
    figures = heldout_rows(study)
    if figures:
        rows.append(("Held-out figures", "; ".join(f"{name} {value}" for name, value in figures)))
    if lung_share_text(study):
        rows.append(("Heatmap", lung_share_text(study)))
    for item in quality_advice(study):
        rows.append(("Image quality", f"{item['text']} {item['action']}"))
    rows.append(("Analysed", when(study.scored_at)))
    return rows


def sign_off_text(version) -> str:
    if version is None:
        return "Not reported: no impression written yet."
    if version.state == "signed":
        text = f"Signed by {version.signed_by.username} on {when(version.signed_at)} (version {version.version})."
    else:
        text = f"DRAFT, not signed (version {version.version})."
    if version.corrects:
        text += f" Corrects version {version.corrects}: {version.correction_reason}"
    return text


# -- the PDF ----------------------------------------------------------------------------------------------

#: Longest side of the film in the web app's PDF (the overlay is drawn at ``OVERLAY_SIDE``, as the page's viewer).
FILM_SIDE, OVERLAY_SIDE = 1400, 1200


def _jpeg(image, max_side: int = FILM_SIDE) -> io.BytesIO:
    """A modest JPEG for the PDF (a full-resolution PNG would make a 20 MB report). ``image``: a file's bytes or a
    decoded Pillow image (left unchanged)."""
    from PIL import Image

    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as opened:
            image = opened.convert("RGB") if opened.mode not in ("L", "RGB") else opened.copy()
    else:
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image.copy()
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=88)
    out.seek(0)
    return out


class _Pdf:
    """fpdf2 with the embedded DejaVu fonts and a few layout helpers."""

    def __init__(self, title: str, fonts: dict | None = None):
        """``fonts``: the parsed fonts of an earlier layout of the same report (fpdf2's ``FPDF.fonts``), taken over
        instead of parsing the two TTF files again (45 ms for both on a 2-core Zen 5). Only for a layout of the
        same text: the fonts keep the glyphs used, which the written file embeds."""
        from fpdf import FPDF

        self.pdf = pdf = FPDF(format="A4")
        pdf.set_auto_page_break(True, margin=14)
        pdf.set_margins(14, 12, 14)
        pdf.set_title(title)
        pdf.set_creator("pneumoscope")
        if fonts:
            pdf.fonts.update(fonts)
        else:
            pdf.add_font("DejaVu", "", str(FONTS / "DejaVuSans.ttf"))
            pdf.add_font("DejaVu", "B", str(FONTS / "DejaVuSans-Bold.ttf"))
        pdf.add_page()

    @property
    def width(self) -> float:
        return self.pdf.w - self.pdf.l_margin - self.pdf.r_margin

    def font(self, size: float, bold: bool = False) -> None:
        self.pdf.set_font("DejaVu", "B" if bold else "", size)

    def heading(self, text: str) -> None:
        self.pdf.ln(1.5)
        self.font(10.5, True)
        self.pdf.set_text_color(20, 60, 110)
        self.pdf.cell(0, 6, text, new_x="LMARGIN", new_y="NEXT")
        self.pdf.set_draw_color(170, 185, 205)
        self.pdf.line(self.pdf.l_margin, self.pdf.get_y(), self.pdf.l_margin + self.width, self.pdf.get_y())
        self.pdf.set_text_color(0, 0, 0)
        self.pdf.ln(1)

    def rows(self, rows: list[tuple[str, str]], label_width: float = 50, size: float = 9) -> None:
        for label, value in rows:
            self.font(size - 0.5, True)
            self.pdf.set_text_color(70, 80, 95)
            self.pdf.cell(label_width, 5, label)
            self.pdf.set_text_color(0, 0, 0)
            self.font(size)
            self.pdf.multi_cell(self.width - label_width, 5, value, new_x="LMARGIN", new_y="NEXT", align="L")

    def paragraph(self, text: str, size: float = 9, bold: bool = False) -> None:
        self.font(size, bold)
        self.pdf.multi_cell(0, 4.4, text, new_x="LMARGIN", new_y="NEXT", align="L")

    def banner(self, text: str, fill: tuple[int, int, int]) -> None:
        self.pdf.set_fill_color(*fill)
        self.pdf.set_text_color(255, 255, 255)
        self.font(9.5, True)
        self.pdf.multi_cell(0, 5.5, text, fill=True, new_x="LMARGIN", new_y="NEXT", padding=(1.2, 2.5), align="L")
        self.pdf.set_text_color(0, 0, 0)
        self.pdf.ln(1.5)


def study_pdf(study: Study, store, identity: dict | None = None, version=None, max_side: int | None = None) -> bytes:
    """The report PDF of a stored study as the web app and the DICOM gateway send it: the film it shows, the
    model's CAM drawn over it as the viewer draws it (or, for a result from before the CAM was kept, the
    transformer's heatmap), the patient block ``identity`` and the report ``version`` (None: not reported).
    ``max_side``: the longest side of the film and the overlay in the PDF (default: the web app's, 1,400 and
    1,200 px); the film is decoded once, whatever the size."""
    from PIL import Image

    from webapp import heatmap

    with Image.open(io.BytesIO(store.get(study.shown_key()))) as image:
        film = image.convert("RGB") if image.mode not in ("L", "RGB") else image.copy()
    film_side, overlay_side = (max_side, max_side) if max_side else (FILM_SIDE, OVERLAY_SIDE)
    aspect = film.height / film.width
    film.thumbnail((film_side, film_side))
    overlay = scale = None
    if study.cam:
        overlay = heatmap.overlay_image(film, study.cam, max_side=overlay_side)
        scale = heatmap.colour_scale_png()
    elif study.has_heatmap:
        overlay = store.get(study.heatmap_key())
    return render_pdf(study, film, identity, version, overlay, scale, heatmap.DEFAULT_CUTOFF, aspect=aspect,
                      max_side=film_side)


def render_pdf(study: Study, film, identity: dict | None = None, version=None, overlay=None,
               scale: bytes | None = None, cutoff: float | None = None, aspect: float | None = None,
               max_side: int = FILM_SIDE) -> bytes:
    """One A4 page: header, patient block, AI finding, film and heatmap (as large as the page allows), the
    doctor's impression and sign-off, the statement. ``film``, ``overlay``: a file's bytes or a decoded Pillow
    image; ``version``: the report version shown (None: not reported); ``overlay``/``scale``: the heatmap over
    the film and its colour scale (``webapp.heatmap``); ``aspect``: the film's height / width, when known.

    Laid out twice: once to measure the text, then with the images grown (or shrunk) into the room left."""
    from PIL import Image

    if aspect is None:
        if isinstance(film, (bytes, bytearray)):
            with Image.open(io.BytesIO(film)) as image:
                aspect = image.height / image.width
        else:
            aspect = film.height / film.width
    film_jpeg = _jpeg(film, max_side)
    overlay_jpeg = _jpeg(overlay, max_side) if overlay is not None else None
    smallest = 45.0
    doc, end = _layout(study, film_jpeg, aspect, identity, version, overlay_jpeg, scale, cutoff, smallest)
    room = doc.pdf.h - doc.pdf.b_margin - end - 2
    if doc.pdf.page > 1:  # the text alone overflows: measure how much from the second page's end
        room = -(end - doc.pdf.t_margin + 8)
    column = (doc.width - 6) / 2 if overlay is not None else doc.width
    height = max(25.0, min(smallest + room, column * aspect))
    if height != smallest:
        film_jpeg.seek(0)
        if overlay_jpeg:
            overlay_jpeg.seek(0)
        doc, _ = _layout(study, film_jpeg, aspect, identity, version, overlay_jpeg, scale, cutoff, height,
                         fonts=doc.pdf.fonts)
    return bytes(doc.pdf.output())


def _layout(study: Study, film_jpeg, aspect: float, identity, version, overlay_jpeg, scale, cutoff,
            image_height: float, fonts: dict | None = None):
    """The report laid out with images ``image_height`` mm tall; returns the document and where its text ends
    (``fonts``: the first layout's, see :class:`_Pdf`)."""
    doc = _Pdf(f"pneumoscope study {study.id}", fonts)
    pdf = doc.pdf
    doc.font(15, True)
    pdf.cell(doc.width * 0.6, 8, "Chest X-ray report")
    doc.font(9)
    pdf.cell(doc.width * 0.4, 8, f"Study #{study.id} · {when(study.created_at)}", align="R",
             new_x="LMARGIN", new_y="NEXT")
    doc.font(8.5)
    pdf.set_text_color(70, 80, 95)
    pdf.cell(0, 4.5, "AI-assisted reading (pneumoscope): pneumonia on a frontal chest radiograph",
             new_x="LMARGIN", new_y="NEXT")
    pdf.set_text_color(0, 0, 0)
    pdf.ln(1.5)
    if is_demonstration(study):
        doc.banner(DEMONSTRATION, (150, 25, 30))
    if version is None or version.state != "signed":
        doc.banner("DRAFT: this report is not signed.", (122, 74, 0))

    doc.heading("Patient")
    doc.rows(patient_rows(identity))
    doc.heading("AI finding")
    doc.rows(finding_rows(study)[2:])
    if study.shown_decision() == "REFER":
        doc.paragraph(REFER_MEANING, 8)
    if study.in_intended_use is False:
        doc.paragraph(OUTSIDE_MEANING, 8)
    if threshold_explanation(study):
        doc.paragraph(threshold_explanation(study), 8)

    pdf.ln(2)
    gap = 6
    column = (doc.width - gap) / 2 if overlay_jpeg else doc.width
    image_width = min(column, image_height / aspect)
    image_height = image_width * aspect
    top = pdf.get_y()
    doc.font(8.5, True)
    pdf.cell(column + gap, 5, "Film")
    if overlay_jpeg:
        pdf.cell(column, 5, "Heatmap: the regions that drove the score", new_x="LMARGIN", new_y="NEXT")
    else:
        pdf.ln(5)
    pdf.image(film_jpeg, x=pdf.l_margin, y=top + 5, w=image_width, h=image_height)
    bottom = top + 5 + image_height
    if overlay_jpeg:
        x = pdf.l_margin + column + gap
        pdf.image(overlay_jpeg, x=x, y=top + 5, w=image_width, h=image_height)
        if scale:
            pdf.image(io.BytesIO(scale), x=x, y=bottom + 1.5, w=image_width, h=3)
            doc.font(7)
            pdf.set_xy(x, bottom + 5)
            pdf.cell(image_width / 2, 3.5, "0")
            pdf.cell(image_width / 2, 3.5, "100 %", align="R")
            pdf.set_xy(x, bottom + 8.5)
            below = f"Grey: below the {cutoff * 100:.0f} % cut-off, not coloured. " if cutoff is not None else ""
            pdf.multi_cell(image_width, 3.3, below + "100 % = this film's strongest evidence.", align="L")
            bottom = pdf.get_y()
    pdf.set_y(bottom + 2)
    impression = version.impression if version is not None and version.impression else "(no impression written)"
    doc.heading("Impression")
    doc.paragraph(impression, 9.5)
    doc.heading("Sign-off")
    doc.paragraph(sign_off_text(version), 9, bold=version is not None and version.state == "signed")
    pdf.ln(1.5)
    doc.paragraph(STATEMENT, 8, bold=True)
    return doc, pdf.get_y()
