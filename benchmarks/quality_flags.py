"""How often each image-quality flag fires on the development data: the share of films that get each warning
(``blurred``, ``object_over_lungs``) and how many carry a detected side marker or corner label (found for
``data prepare --mask-text``, never a warning), per data set and class. The goal: no warning on more than
10 % of ordinary films.

    python benchmarks/quality_flags.py --out runs/quality_flags.json

Each film is decoded as the transformer decodes an upload (stage 1), then measured by ``model.quality.assess``,
the function the transformer runs. ``--examples DIR`` writes a contact sheet of the films that got a warning,
with the boxes drawn, to look at by eye.

And how often the warnings are right on planted marks, on every film of chest_xray_full/train: a label "AP 10:42"
printed in bold white over the right lung (it should warn: ``object_over_lungs``) and an "R" side marker in its
dark box in the top-left corner (it should not), as ``tests/model/test_quality_gate.py`` plants them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model import quality
from model.preprocessing import decode

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {"chest_xray_224/train": "chest_xray_224/train", "chest_xray_full/train": "chest_xray_full/train"}
WARNINGS = (quality.FLAG_BLURRED, quality.FLAG_OVER_LUNGS)


def measure(folder: Path, examples: list | None = None) -> dict:
    """Counts per class: films, each warning, any warning, detected markers."""
    out = {}
    for cls_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in cls_folder.iterdir() if f.is_file())
        counts = {"films": len(files), **{flag: 0 for flag in WARNINGS}, "any_warning": 0, "markers_detected": 0}
        for i, f in enumerate(files):
            gray = decode(f.read_bytes()).pixels
            report = quality.assess(gray)
            for flag in report.flags:
                counts[flag] += 1
            counts["any_warning"] += bool(report.flags)
            counts["markers_detected"] += bool(report.text_boxes)
            if report.flags and examples is not None:
                examples.append((gray, report))
            if (i + 1) % 1000 == 0:
                print(f"  {cls_folder.name}: {i + 1}/{len(files)}", file=sys.stderr, flush=True)
        out[cls_folder.name] = counts
    total = {key: sum(c[key] for c in out.values()) for key in next(iter(out.values()))}
    out["all"] = total
    for counts in out.values():
        counts["percent"] = {key: round(100 * counts[key] / max(1, counts["films"]), 2)
                             for key in (*WARNINGS, "any_warning", "markers_detected")}
    return out


def planted(data: bytes, text: str, where: str) -> bytes:
    """The film with ``text`` burned in: over the right lung (bold) or in the top-left corner (in a dark box)."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    image = Image.open(io.BytesIO(data)).convert("L")
    w, h = image.size
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(12, h // 12) if len(text) == 1 else max(9, h // 22))
    x, y = (int(0.24 * w), int(0.4 * h)) if where == "lung" else (int(0.03 * w), int(0.03 * h))
    if where != "lung":
        left, top, right, bottom = draw.textbbox((x, y), text, font=font)
        draw.rectangle((left - 3, top - 3, right + 3, bottom + 3), fill=10)
    draw.text((x, y), text, fill=250, font=font, stroke_width=max(0, h // 250) if where == "lung" else 0,
              stroke_fill=250)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def planted_marks(folder: Path) -> dict:
    """How many films warn with a label planted over the lung, and with a side marker planted in a corner."""
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    over_lung = corner = 0
    for f in files:
        data = f.read_bytes()
        over_lung += quality.FLAG_OVER_LUNGS in quality.assess(decode(planted(data, "AP 10:42", "lung")).pixels).flags
        corner += bool(quality.assess(decode(planted(data, "R", "corner")).pixels).flags)
    return {"films": len(files), "label_over_lung_warned": over_lung, "corner_marker_warned": corner,
            "percent": {"label_over_lung_warned": round(100 * over_lung / len(files), 1),
                        "corner_marker_warned": round(100 * corner / len(files), 1)}}


def contact_sheet(examples: list, path: Path, columns: int = 6) -> None:
    from PIL import Image, ImageDraw

    size = quality.ANALYSIS_SIZE
    rows = max(1, (len(examples) + columns - 1) // columns)
    sheet = Image.new("RGB", (columns * size, rows * size))
    for i, (gray, report) in enumerate(examples):
        tile = Image.fromarray(quality.analysis_pixels(gray)).convert("RGB")
        draw = ImageDraw.Draw(tile)
        for y0, x0, y1, x1 in report.lung_boxes:
            draw.rectangle((x0 * size - 2, y0 * size - 2, x1 * size + 2, y1 * size + 2), outline=(255, 60, 60))
        draw.text((4, size - 14), ",".join(report.flags), fill=(255, 255, 0))
        sheet.paste(tile, ((i % columns) * size, (i // columns) * size))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA), help="the shared data folder")
    parser.add_argument("--out", help="also write the JSON report here")
    parser.add_argument("--examples", help="folder for a contact sheet of the warned films per data set")
    args = parser.parse_args()
    from serving_throughput import write_report  # this folder is on the path when run as a script

    report = {"warnings": list(WARNINGS), "thresholds": vars(quality.QualityThresholds()),
              "lung_fields": quality.LUNG_FIELDS, "sets": {}}
    started = time.perf_counter()
    for name, relative in SETS.items():
        folder = Path(args.data) / relative
        if not folder.is_dir():
            sys.exit(f"{folder} not found: the shared development data is missing (see ../shared/data/README.md)")
        print(f"measuring {name}", file=sys.stderr, flush=True)
        examples: list | None = [] if args.examples else None
        report["sets"][name] = measure(folder, examples)
        if examples:
            contact_sheet(examples[:60], Path(args.examples) / f"{name.replace('/', '_')}.png")
    print("planting marks on chest_xray_full/train", file=sys.stderr, flush=True)
    report["planted"] = planted_marks(Path(args.data) / "chest_xray_full" / "train")
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
