"""Data ingest: find images, quality-gate them, split by patient, write the uint8 cache + manifest.

Sources (local path, PVC mount or any fsspec URL such as ``s3://bucket/prefix``):
- the Kaggle layout ``{train,val,test}/{NORMAL,PNEUMONIA}/*``;
- class folders ``{NORMAL,PNEUMONIA}/*`` of PNG/JPEG/DICOM files (all treated as the training pool);
- MedMNIST ``pneumoniamnist*.npz`` files.

Splits in the manifest: ``train``/``val``/``holdout`` are carved from the official training pool,
grouped by patient and stratified by class; ``sanity`` is the official 16-image val; ``test`` the
official test split when present (never used for any choice).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing
import re
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.errors import InvalidImageError
from model.preprocessing import PreprocessConfig, load_resized
from model.settings import available_cpus

log = logging.getLogger(__name__)

CLASSES = ("NORMAL", "PNEUMONIA")
OFFICIAL_SPLITS = {"train": "train", "val": "sanity", "test": "test"}
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".dcm", ".dicom", ""}
MANIFEST_FIELDS = ("index", "file", "sha256", "patient", "label", "subtype", "split", "width", "height", "sharpness",
                   "quality_flags")
QUALITY_THUMBNAILS = 4  # examples per flag in OUT/quality/

_PERSON = re.compile(r"(person\d+)_(bacteria|virus)", re.IGNORECASE)
_IM = re.compile(r"((?:NORMAL2-)?IM-\d+)", re.IGNORECASE)


class DataError(Exception):
    """A problem with the data set as a whole (missing folder, empty class): stop with one line."""


def parse_patient(file_name: str) -> tuple[str, str]:
    """(patient id, subtype) from a Kaggle file name; unknown names are their own patient."""
    stem = Path(file_name).stem
    match = _PERSON.search(stem)
    if match:
        return match.group(1).lower(), match.group(2).lower()
    match = _IM.search(stem)
    if match:
        return match.group(1).upper(), "normal"
    return stem, "unknown"


@dataclass
class SourceImage:
    key: str  # path relative to the source root (or "npz:<split>:<i>")
    label: int  # 1 = PNEUMONIA
    official_split: str  # train | val | test
    patient: str
    subtype: str


@dataclass
class PreparedData:
    out_dir: Path
    summary: dict
    manifest_sha256: str


@dataclass
class SplitFractions:
    val: float = 0.15
    holdout: float = 0.10
    seed: int = 42


def open_source(uri: str):
    """fsspec filesystem + root path for a local path or URL; raise DataError if it is not there."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri)
    try:
        exists = fs.isdir(root)
    except Exception as exc:  # network/credential errors from remote stores
        raise DataError(f"cannot read data source {uri}: {exc}") from None
    if not exists:
        raise DataError(f"data folder not found: {uri}")
    return fs, root.rstrip("/")


def discover(uri: str) -> tuple[object, str, list[SourceImage]]:
    fs, root = open_source(uri)
    entries = {Path(p).name: p for p in fs.ls(root, detail=False)}
    npz = sorted(p for name, p in entries.items() if name.startswith("pneumoniamnist") and name.endswith(".npz"))
    if npz:
        return fs, root, _discover_npz(fs, npz[0])
    splits = [s for s in OFFICIAL_SPLITS if s in entries and fs.isdir(entries[s])]
    layouts = [(s, entries[s]) for s in splits] if splits else [("train", root)]
    images: list[SourceImage] = []
    for split, split_root in layouts:
        for label, cls in enumerate(CLASSES):
            cls_dir = f"{split_root}/{cls}"
            if not fs.isdir(cls_dir):
                if split == "train":
                    raise DataError(f"class folder missing: {cls_dir} (expected {'/'.join(CLASSES)} under {split_root})")
                continue
            files = sorted(p for p in fs.find(cls_dir) if _is_image_name(p))
            if not files and split == "train":
                raise DataError(f"class folder is empty: {cls_dir}")
            for path in files:
                patient, subtype = parse_patient(Path(path).name)
                images.append(SourceImage(path[len(root) + 1:], label, split, patient, subtype))
    return fs, root, images


def _is_image_name(path: str) -> bool:
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES and name.upper() != "README"


def _discover_npz(fs, path: str) -> list[SourceImage]:
    with fs.open(path, "rb") as fh:
        arrays = np.load(io.BytesIO(fh.read()))
    images = []
    for split in ("train", "val", "test"):
        labels = arrays[f"{split}_labels"].reshape(-1)
        for i, label in enumerate(labels):
            # MedMNIST carries no patient ids: each image is its own group (said in the summary).
            images.append(SourceImage(f"npz:{path}:{split}:{i}", int(label), split, f"{split}-{i}", "unknown"))
    return images


MEDMNIST_URL = "https://zenodo.org/records/10519652/files/pneumoniamnist_224.npz"
KAGGLE_HELP = ("no chest X-ray data found: download the Kaggle data set 'Chest X-Ray Images (Pneumonia)' "
               "(Kermany et al., CC BY 4.0), unpack it so that chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/ "
               "exists and set PNEUMOSCOPE_DATA=/path/to/chest_xray (or pass --data), or point PNEUMOSCOPE_DATA "
               "at a folder holding MedMNIST's pneumoniamnist_224.npz")


def resolve_source(explicit: str | None, download_dir: Path, shared: Path) -> str:
    """The data a demo uses: explicit/PNEUMOSCOPE_DATA, else ../shared/data, else MedMNIST."""
    if explicit:
        return explicit
    if shared.is_dir():
        return str(shared)
    target = download_dir / "pneumoniamnist_224.npz"
    if not target.exists():
        import urllib.request

        log.info("no local data: trying to download MedMNIST pneumoniamnist (224 px)")
        download_dir.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(MEDMNIST_URL, timeout=20) as response, open(f"{target}.part", "wb") as fh:
                fh.write(response.read())
            Path(f"{target}.part").replace(target)
        except OSError as exc:
            raise DataError(f"{KAGGLE_HELP} (the MedMNIST download failed: {exc})") from None
    return str(download_dir)


# ---------------------------------------------------------------------------------------------
# Quality gate (runs in worker processes)

_worker_state: dict = {}


def _init_worker(fs, root: str, config: PreprocessConfig, lung_model: str | None = None) -> None:
    segmenter = None
    if lung_model and config.lung_crop != "none":
        from model.lung_fields import LungSegmenter

        segmenter = LungSegmenter.from_folder(lung_model, threads=1)  # the workers are the parallelism
    _worker_state.update(fs=fs, root=root, config=config, npz={}, segmenter=segmenter)


def _read_bytes(key: str) -> bytes:
    fs, root = _worker_state["fs"], _worker_state["root"]
    if key.startswith("npz:"):
        _, path, split, index = key.rsplit(":", 3)
        cache = _worker_state["npz"]
        if path not in cache:
            with fs.open(path, "rb") as fh:
                cache[path] = dict(np.load(io.BytesIO(fh.read())))
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(cache[path][f"{split}_images"][int(index)]).save(buf, format="PNG")
        return buf.getvalue()
    with fs.open(f"{root}/{key}", "rb") as fh:
        return fh.read()


#: Reading one file of a remote source (s3://...): attempts, and the first back-off (doubled each time, with
#: jitter). With s3fs's and botocore's own retries inside each attempt, an outage of up to about half a minute
#: is ridden out; a longer one stops the ingest with one line instead of training on what happened to arrive.
REMOTE_READ_ATTEMPTS = 5
REMOTE_READ_BACKOFF_S = 1.0


def _read_remote(key: str) -> bytes:
    """``_read_bytes`` with retries: a remote file that cannot be read now is not a bad image. Only a missing
    file counts as unreadable; when the store stays away, the whole ingest fails (DataError)."""
    import random

    last = None
    for attempt in range(REMOTE_READ_ATTEMPTS):
        try:
            return _read_bytes(key)
        except FileNotFoundError:
            raise
        except Exception as exc:  # botocore/aiohttp errors have no common base
            last = exc
            if attempt + 1 < REMOTE_READ_ATTEMPTS:
                time.sleep(REMOTE_READ_BACKOFF_S * 2 ** attempt * random.uniform(0.8, 1.2))
    detail = (str(last).strip().splitlines() or [type(last).__name__])[0][:200]
    raise DataError(f"the data source {_worker_state['root']} did not answer reading {key} after "
                    f"{REMOTE_READ_ATTEMPTS} attempts ({detail}); nothing was written: run the ingest again when "
                    f"it is back")


def _gate_one(key: str):
    from model import quality

    fs = _worker_state["fs"]
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    try:
        data = _read_bytes(key) if local else _read_remote(key)
    except OSError as exc:
        return key, None, None, None, "unreadable", str(exc), None
    digest = hashlib.sha256(data).hexdigest()
    config = _worker_state["config"]
    try:
        image = load_resized(data, config, segmenter=_worker_state.get("segmenter"))
        # Blur and text are measured at one analysis resolution, whatever the cache's, as serving does.
        same = (config.image_size == quality.ANALYSIS_SIZE and config.resize_mode == "squash"
                and config.lung_crop == "none")
        analysis = image.pixels if same else \
            load_resized(data, PreprocessConfig(image_size=quality.ANALYSIS_SIZE)).pixels
    except InvalidImageError as exc:
        return key, digest, None, None, exc.reason, str(exc), None
    return key, digest, image.pixels, image.original_size, None, None, quality.assess(analysis)


def gate_images(fs, root: str, images: list[SourceImage], config: PreprocessConfig, workers: int,
                lung_model: str | None = None):
    """Decode every image once. Returns {key: (sha, pixels, size, QualityReport)} and {key: (reason, detail)}."""
    from tqdm import tqdm

    accepted, rejected = {}, {}
    keys = [img.key for img in images]
    chunk = max(1, min(64, len(keys) // (workers * 8) or 1))
    if workers <= 1:
        _init_worker(fs, root, config, lung_model)
        results = map(_gate_one, keys)
        pool = None
    else:
        # Remote filesystems (s3fs...) are not fork-safe: their workers are spawned, and the pickled
        # filesystem object reconnects in each one. Local files keep the cheaper fork.
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        context = multiprocessing.get_context("fork" if local else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                   initargs=(fs, root, config, lung_model))
        results = pool.map(_gate_one, keys, chunksize=chunk)
    try:
        for key, digest, pixels, size, reason, detail, report in tqdm(results, total=len(keys), desc="decode",
                                                                      unit="img", mininterval=2, disable=None):
            if reason:
                rejected[key] = (reason, detail, digest)
            else:
                accepted[key] = (digest, pixels, size, report)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)  # after a failure, the queued images are not read
    return accepted, rejected


def deduplicate(images: list[SourceImage], accepted: dict, rejected: dict) -> list[SourceImage]:
    """Keep one image per content hash; drop test duplicates from the training side (leakage)."""
    by_hash: dict[str, list[SourceImage]] = defaultdict(list)
    for img in images:
        if img.key in accepted:
            by_hash[accepted[img.key][0]].append(img)
    kept = []
    for group in by_hash.values():
        group.sort(key=lambda i: i.key)
        if len({i.label for i in group}) > 1:
            for img in group:
                rejected[img.key] = ("duplicate_conflicting_label", "same bytes filed under both classes", None)
            continue
        in_test = [i for i in group if i.official_split == "test"]
        if in_test:
            keep = in_test[0]
            for img in group:
                if img is keep:
                    continue
                reason = "leak_duplicate_of_test" if img.official_split != "test" else "duplicate"
                rejected[img.key] = (reason, f"identical to {keep.key}", None)
        else:
            keep = group[0]
            for img in group[1:]:
                rejected[img.key] = ("duplicate", f"identical to {keep.key}", None)
        kept.append(keep)
    return sorted(kept, key=lambda i: i.key)


#: A pool is cut into this many patient-grouped, class-stratified folds (fewer for a small pool); a split
#: takes round(fraction * folds) of them, so its share is within 1/80 of the configured fraction.
SPLIT_FOLDS = 40


def split_by_patient(pool: list[SourceImage], fractions: SplitFractions) -> dict[str, str]:
    """Assign train/val/holdout to each image, grouped by patient and stratified by class.

    One ``StratifiedGroupKFold`` pass cuts the pool into folds of about 1/K of it each; holdout takes the
    first round(holdout * K) folds and val the next round(val * K). (Carving each split as ONE fold of
    round(1 / fraction) folds gave 1/3 for 0.3 and 1/2 for 0.4.)
    """
    from sklearn.model_selection import StratifiedGroupKFold

    assignment = {img.key: "train" for img in pool}
    wanted = [(split, fraction) for split, fraction in (("holdout", fractions.holdout), ("val", fractions.val))
              if fraction > 0]
    if not wanted or len(pool) < 4:
        return assignment
    if fractions.val + fractions.holdout >= 1:
        raise DataError(f"val ({fractions.val}) and holdout ({fractions.holdout}) fractions leave nothing to train on")
    labels = np.array([img.label for img in pool])
    groups = np.array([img.patient for img in pool])
    # every fold needs patients of both classes: no more folds than the rarer class has patients
    patients_per_class = Counter(label for label, _ in set(zip(labels.tolist(), groups.tolist())))
    folds = min(SPLIT_FOLDS, min(patients_per_class.values()))
    if len(patients_per_class) < 2 or folds < len(wanted) + 1:
        raise DataError(f"too few images per class to carve a {'/'.join(s for s, _ in wanted)} split grouped by patient")
    counts = [max(1, round(fraction * folds)) for _, fraction in wanted]
    while sum(counts) >= folds:  # keep at least one fold for training
        counts[counts.index(max(counts))] -= 1
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=fractions.seed)
    test_folds = [picked for _, picked in splitter.split(np.zeros(len(pool)), labels, groups)]
    first = 0
    for (split, _), count in zip(wanted, counts):
        for picked in test_folds[first:first + count]:
            for i in picked.tolist():
                assignment[pool[i].key] = split
        first += count
    return assignment


def check_patient_leakage(rows: list[dict]) -> dict:
    """Patients (and hashes) seen on both sides of train vs val/holdout/test."""
    sides = defaultdict(set)
    hashes = defaultdict(set)
    for row in rows:
        sides[row["split"]].add(row["patient"])
        hashes[row["split"]].add(row["sha256"])
    report = {}
    for other in ("val", "holdout", "test"):
        report[f"patients_train_and_{other}"] = len(sides["train"] & sides[other])
        report[f"images_train_and_{other}"] = len(hashes["train"] & hashes[other])
    return report


def prepare(source: str, out_dir: str | Path, image_size: int, fractions: SplitFractions | None = None,
            workers: int | None = None, limit_per_class: int | None = None, exclude_blurred: bool = False,
            mask_text: bool = False, resize_mode: str = "squash", lung_model: str | Path | None = None,
            lung_crop: str = "none", lung_margin: float = 0.1) -> PreparedData:
    """Ingest ``source`` and write ``images.npy``, ``manifest.csv``, ``excluded.csv``, ``summary.json`` and
    example thumbnails of flagged films in ``quality/``.

    ``exclude_blurred``: drop training-pool films whose sharpness is far below the pool's (the sanity and
    test splits are only reported, never thinned). ``mask_text``: paint detected burned-in text and markers
    over with their surroundings in the cached pixels (training only: serving reports them, it does not
    mask; pair it with ``--erase-borders`` so the model learns that the border carries no signal).
    ``lung_crop`` ("box", "mask", "box+mask") crops/masks every image to its lung fields as found by the lung
    segmentation model in the folder ``lung_model``, which is copied into ``OUT/lung`` so that evaluation puts
    the very same graph into the bundle (the predictor runs it to compute the same pixels).
    """
    fractions = fractions or SplitFractions()
    workers = workers or available_cpus()
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # summary.json is written last and marks a complete cache: without it an interrupted run over an earlier
    # cache would leave the old summary beside new, partly written images and manifest
    (out / "summary.json").unlink(missing_ok=True)
    fs, root, images = discover(source)
    if limit_per_class:
        images = _subsample(images, limit_per_class, fractions.seed)
    log.info("found %d images under %s", len(images), source)
    config = PreprocessConfig(image_size=image_size, resize_mode=resize_mode, lung_crop=lung_crop,
                              lung_margin=lung_margin)
    lung_copy = _copy_lung_model(lung_model, out, lung_crop)
    accepted, rejected = gate_images(fs, root, images, config, workers, str(lung_copy) if lung_copy else None)
    kept = deduplicate(images, accepted, rejected)
    kept, quality_summary = _quality_gate(kept, accepted, rejected, out, exclude_blurred, mask_text)

    pool = [img for img in kept if img.official_split == "train"]
    for label, cls in enumerate(CLASSES):
        if not any(img.label == label for img in pool):
            raise DataError(f"no usable {cls} images in the training data of {source}")
    assignment = split_by_patient(pool, fractions)
    rows, arrays = [], []
    for img in kept:
        digest, pixels, (width, height), report = accepted[img.key]
        split = assignment.get(img.key) or OFFICIAL_SPLITS[img.official_split]
        rows.append({"index": len(rows), "file": img.key, "sha256": digest, "patient": img.patient,
                     "label": img.label, "subtype": img.subtype, "split": split, "width": width, "height": height,
                     "sharpness": round(report.sharpness, 2), "quality_flags": ";".join(report.detections)})
        arrays.append(pixels)
    stack = np.stack(arrays).astype(np.uint8)
    np.save(out / "images.npy", stack)

    train_idx = [r["index"] for r in rows if r["split"] == "train"]
    train_pixels = stack[train_idx].astype(np.float32) / 255.0
    per_image_mean = stack[train_idx].reshape(len(train_idx), -1).mean(axis=1)
    config = PreprocessConfig(image_size=image_size, resize_mode=resize_mode, lung_crop=lung_crop,
                              lung_margin=lung_margin, mean=round(float(train_pixels.mean()), 6),
                              std=round(float(train_pixels.std()), 6),
                              train_intensity_mean=round(float(per_image_mean.mean()), 4),
                              train_intensity_std=round(float(per_image_mean.std()), 4))
    del train_pixels

    manifest_path = out / "manifest.csv"
    _write_csv(manifest_path, MANIFEST_FIELDS, rows)
    _write_csv(out / "excluded.csv", ("file", "reason", "detail"),
               [{"file": k, "reason": r, "detail": d} for k, (r, d, _) in sorted(rejected.items())])
    manifest_sha = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    summary = {
        "source": source,
        "found": len(images),
        "kept": len(rows),
        "excluded": dict(Counter(r for r, _, _ in rejected.values())),
        "splits": {s: dict(Counter(CLASSES[r["label"]] for r in rows if r["split"] == s))
                   for s in ("train", "val", "holdout", "sanity", "test")},
        "patients": {s: len({r["patient"] for r in rows if r["split"] == s}) for s in ("train", "val", "holdout")},
        "unparsed_patient_ids": sum(1 for img in kept if img.subtype == "unknown"),
        "leakage": check_patient_leakage(rows),
        "quality": quality_summary,
        "preprocess": config.to_dict(),
        "lung_model": _lung_model_summary(lung_copy),
        "manifest_sha256": manifest_sha,
        "fractions": vars(fractions),
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("kept %d of %d images; excluded %s; splits %s", len(rows), len(images), summary["excluded"] or "none",
             summary["splits"])
    log.info("quality: %d blurred (sharpness < %.1f%s), %d with burned-in text or markers%s",
             quality_summary["blurred"], quality_summary["sharpness_cutoff"],
             ", excluded from training" if exclude_blurred else ", kept", quality_summary["text_overlay"],
             ", masked in the cache" if mask_text else "")
    leaks = {k: v for k, v in summary["leakage"].items() if v}
    if leaks:
        log.warning("leakage between splits: %s", leaks)
    return PreparedData(out, summary, manifest_sha)


#: The lung segmentation model a lung-cropped cache was made with, inside the cache (evaluation bundles it).
CACHE_LUNG_DIR = "lung"


def _copy_lung_model(lung_model: str | Path | None, out: Path, lung_crop: str) -> Path | None:
    """Copy the segmentation model into the cache (None when the cache does not crop to the lungs)."""
    import shutil

    from model.lung_fields import LUNG_META, LUNG_ONNX

    if lung_crop == "none":
        return None
    if not lung_model:
        raise DataError(f"--lung-crop {lung_crop} needs --lung-model (a folder written by `pneumoscope lungs train`)")
    source = Path(lung_model)
    if not (source / LUNG_ONNX).is_file() or not (source / LUNG_META).is_file():
        raise DataError(f"{source} holds no {LUNG_ONNX} + {LUNG_META} (write one with `pneumoscope lungs train`)")
    target = out / CACHE_LUNG_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in (LUNG_ONNX, LUNG_META):
        shutil.copyfile(source / name, target / name)
    return target


def _lung_model_summary(folder: Path | None) -> dict | None:
    from model.bundle import sha256_file

    if folder is None:
        return None
    return {"folder": CACHE_LUNG_DIR, "sha256": sha256_file(folder / "lung.onnx")}


def _quality_gate(kept: list[SourceImage], accepted: dict, rejected: dict, out: Path, exclude_blurred: bool,
                  mask_text: bool) -> tuple[list[SourceImage], dict]:
    """Flag blurred films against the training pool's own sharpness distribution; flag (and optionally mask)
    burned-in text; exclude blurred pool films when asked; write example thumbnails."""
    from model import quality

    pool = [img for img in kept if img.official_split == "train"]
    values = np.array([accepted[img.key][3].sharpness for img in pool]) if pool else np.array([1.0])
    cutoff = quality.sharpness_cutoff(values)
    blurred, texts, over_lungs, excluded, masked = [], [], [], 0, 0
    for img in kept:
        digest, pixels, size, report = accepted[img.key]
        report.flags = [f for f in report.flags if f != quality.FLAG_BLURRED]
        if report.sharpness < cutoff:
            report.flags.insert(0, quality.FLAG_BLURRED)
            blurred.append(img)
        if report.lung_boxes:
            over_lungs.append(img)
        if report.text_boxes:
            texts.append(img)
            if mask_text:
                accepted[img.key] = (digest, quality.mask_boxes(pixels, report.text_boxes), size, report)
                masked += 1
    if exclude_blurred:
        for img in blurred:
            if img.official_split == "train":
                detail = (f"sharpness {accepted[img.key][3].sharpness:.1f} < cut-off {cutoff:.1f} "
                          f"(variance of the Laplacian at {quality.ANALYSIS_SIZE} px)")
                rejected[img.key] = ("blurred", detail, accepted[img.key][0])
                excluded += 1
        kept = [img for img in kept if img.key not in rejected]
    thumbnails = _write_thumbnails(out / "quality", {"blurred": blurred, "text_overlay": texts,
                                                     quality.FLAG_OVER_LUNGS: over_lungs}, accepted)
    return kept, {"analysis_size": quality.ANALYSIS_SIZE, "sharpness_cutoff": round(cutoff, 2),
                  "sharpness_median": round(float(np.median(values)), 2), "blurred": len(blurred),
                  "text_overlay": len(texts), quality.FLAG_OVER_LUNGS: len(over_lungs),
                  "excluded_blurred": excluded, "masked_text": masked,
                  "thumbnails": thumbnails}


def _write_thumbnails(folder: Path, groups: dict[str, list[SourceImage]], accepted: dict) -> list[str]:
    """A few flagged examples as small PNGs; detected text is blacked out (where, not what: it may be PHI)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for flag, images in groups.items():
        for i, img in enumerate(images[:QUALITY_THUMBNAILS]):
            pixels, report = accepted[img.key][1], accepted[img.key][3]
            shown = np.array(pixels, copy=True)
            h, w = shown.shape
            for y0, x0, y1, x1 in report.text_boxes + report.lung_boxes:
                shown[int(y0 * h):int(np.ceil(y1 * h)), int(x0 * w):int(np.ceil(x1 * w))] = 0
            name = f"{flag}_{i + 1}.png"
            Image.fromarray(shown).resize((128, 128)).save(folder / name)
            written.append(f"quality/{name}")
    return written


def _subsample(images: list[SourceImage], per_class: int, seed: int) -> list[SourceImage]:
    """A small, patient-complete subset for smoke runs: whole patients until the quota is met."""
    rng = np.random.default_rng(seed)
    chosen = []
    for split in ("train", "val", "test"):
        for label in (0, 1):
            by_patient = defaultdict(list)
            for img in images:
                if img.official_split == split and img.label == label:
                    by_patient[img.patient].append(img)
            patients = sorted(by_patient)
            rng.shuffle(patients)
            quota = per_class if split == "train" else max(2, per_class // 8)
            taken = 0
            for patient in patients:
                if taken >= quota:
                    break
                chosen.extend(by_patient[patient])
                taken += len(by_patient[patient])
    return chosen


def _write_csv(path: Path, fields, rows) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class CachedData:
    """The preprocessed cache as written by ``prepare``."""

    images: np.ndarray  # uint8 (N, S, S), memory-mapped
    manifest: list[dict]
    summary: dict
    config: PreprocessConfig = field(init=False)

    def __post_init__(self):
        self.config = PreprocessConfig.from_dict(self.summary["preprocess"])

    @classmethod
    def load(cls, cache_dir: str | Path) -> "CachedData":
        cache = Path(cache_dir)
        if not (cache / "manifest.csv").exists():
            raise DataError(f"no prepared data in {cache} (run `pneumoscope data prepare` first)")
        incomplete = (f"the prepared data in {cache} is incomplete (an interrupted `pneumoscope data prepare`?): "
                      "run it again")
        try:
            summary = json.loads((cache / "summary.json").read_text())
        except (FileNotFoundError, ValueError):
            raise DataError(incomplete) from None
        with (cache / "manifest.csv").open() as fh:
            manifest = [dict(r, index=int(r["index"]), label=int(r["label"])) for r in csv.DictReader(fh)]
        try:
            images = np.load(cache / "images.npy", mmap_mode="r")
        except (OSError, ValueError):
            raise DataError(incomplete) from None
        if any(r["index"] >= len(images) for r in manifest):  # images.npy cut short
            raise DataError(incomplete)
        return cls(images, manifest, summary)

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(indices into images, labels) of one split."""
        rows = [r for r in self.manifest if r["split"] == name]
        return (np.array([r["index"] for r in rows], dtype=np.int64),
                np.array([r["label"] for r in rows], dtype=np.int64))
