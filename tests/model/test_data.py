"""Data ingest: patient ids, the quality gate, deduplication, leakage and the patient-grouped split."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data import DataError, SplitFractions, SourceImage, parse_patient, prepare, split_by_patient
from conftest import make_kaggle_subset


@pytest.mark.parametrize("name, patient, subtype", [
    ("person1234_bacteria_5678.jpeg", "person1234", "bacteria"),
    ("person99_virus_183.jpeg", "person99", "virus"),
    ("IM-0123-0001.jpeg", "IM-0123", "normal"),
    ("NORMAL2-IM-0123-0001.jpeg", "NORMAL2-IM-0123", "normal"),
    ("IM-0123-0001-0002.jpeg", "IM-0123", "normal"),
    ("scan_42.png", "scan_42", "unknown"),
])
def test_patient_id_is_parsed_from_the_file_name(name, patient, subtype):
    assert parse_patient(name) == (patient, subtype)


def _png(value: int, size: int = 96, seed: int | None = None) -> bytes:
    rng = np.random.default_rng(seed if seed is not None else value)
    pixels = np.clip(rng.normal(value, 40, (size, size)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _synthetic_kaggle(root: Path, per_class: int = 12, patients_per_class: int = 6) -> Path:
    """A Kaggle-layout folder of synthetic PNGs: several images per patient."""
    for cls, stem in (("NORMAL", "IM-{p:04d}-{i:04d}"), ("PNEUMONIA", "person{p}_bacteria_{i}")):
        folder = root / "train" / cls
        folder.mkdir(parents=True)
        for i in range(per_class):
            p = i % patients_per_class + (0 if cls == "NORMAL" else 500)
            (folder / f"{stem.format(p=p, i=i)}.png").write_bytes(_png(100 + i, seed=hash((cls, i)) % 1000))
    return root


def _manifest(out: Path) -> list[dict]:
    with (out / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_split_is_grouped_by_patient_and_stratified():
    pool = []
    for p in range(60):
        label = int(p % 4 != 0)  # ~75 % pneumonia, like the real data
        for i in range(1 + p % 3):
            pool.append(SourceImage(f"k{p}_{i}", label, "train", f"patient{p}", "x"))
    assignment = split_by_patient(pool, SplitFractions(val=0.2, holdout=0.1, seed=1))
    sides = defaultdict(set)
    for img in pool:
        sides[img.patient].add(assignment[img.key])
    assert all(len(s) == 1 for s in sides.values()), "a patient landed on two sides of the split"
    for split in ("train", "val", "holdout"):
        labels = [img.label for img in pool if assignment[img.key] == split]
        assert labels and 0 < np.mean(labels) < 1, f"{split} must hold both classes"
    val_share = sum(assignment[i.key] == "val" for i in pool) / len(pool)
    assert 0.1 < val_share < 0.3


def test_quality_gate_excludes_and_reports_bad_files(tmp_path):
    root = _synthetic_kaggle(tmp_path / "data")
    normal = root / "train" / "NORMAL"
    good = (normal / "IM-0000-0000.png").read_bytes()
    (normal / "IM-0900-0001.png").write_bytes(good)  # exact duplicate under another name
    (normal / "IM-0901-0001.jpeg").write_bytes(b"this is not an image")
    jpeg = io.BytesIO()
    Image.fromarray(np.full((200, 200), 120, np.uint8)).save(jpeg, format="JPEG")
    (normal / "IM-0902-0001.jpeg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])  # truncated
    tiny = io.BytesIO()
    Image.fromarray(np.full((20, 20), 120, np.uint8)).save(tiny, format="PNG")
    (normal / "IM-0903-0001.png").write_bytes(tiny.getvalue())  # too small to use
    result = prepare(str(root), tmp_path / "cache", 64, SplitFractions(0.2, 0.0, 0), workers=1)
    excluded = result.summary["excluded"]
    assert excluded == {"duplicate": 1, "not_an_image": 1, "corrupt": 1, "too_small": 1}
    with (tmp_path / "cache" / "excluded.csv").open() as fh:
        rows = {r["file"]: r["reason"] for r in csv.DictReader(fh)}
    assert rows["train/NORMAL/IM-0903-0001.png"] == "too_small"
    manifest = _manifest(tmp_path / "cache")
    assert len(manifest) == 24
    assert set(manifest[0]) >= {"file", "sha256", "patient", "label", "split"}
    images = np.load(tmp_path / "cache" / "images.npy")
    assert images.shape == (24, 64, 64) and images.dtype == np.uint8


def test_duplicates_of_test_images_are_removed_from_training(tmp_path):
    root = _synthetic_kaggle(tmp_path / "data")
    (root / "test" / "NORMAL").mkdir(parents=True)
    (root / "test" / "PNEUMONIA").mkdir(parents=True)
    leaked = root / "train" / "PNEUMONIA" / "person500_bacteria_0.png"
    shutil.copy(leaked, root / "test" / "PNEUMONIA" / "person9999_bacteria_1.png")
    (root / "test" / "NORMAL" / "IM-9999-0001.png").write_bytes(_png(77, seed=4242))
    result = prepare(str(root), tmp_path / "cache", 64, SplitFractions(0.2, 0.0, 0), workers=1)
    assert result.summary["excluded"] == {"leak_duplicate_of_test": 1}
    manifest = _manifest(tmp_path / "cache")
    hashes = defaultdict(set)
    for row in manifest:
        hashes[row["split"] == "test"].add(row["sha256"])
    assert not hashes[True] & hashes[False], "an image sits in both train and test"
    assert result.summary["leakage"]["images_train_and_test"] == 0
    assert result.summary["splits"]["test"] == {"NORMAL": 1, "PNEUMONIA": 1}


def test_same_bytes_under_both_classes_are_dropped(tmp_path):
    root = _synthetic_kaggle(tmp_path / "data")
    shutil.copy(root / "train" / "NORMAL" / "IM-0000-0000.png", root / "train" / "PNEUMONIA" / "person777_virus_1.png")
    result = prepare(str(root), tmp_path / "cache", 64, SplitFractions(0.2, 0.0, 0), workers=1)
    assert result.summary["excluded"] == {"duplicate_conflicting_label": 2}


def test_missing_folder_and_empty_class_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        prepare(str(tmp_path / "nope"), tmp_path / "cache", 64)
    (tmp_path / "data" / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "data" / "train" / "PNEUMONIA").mkdir(parents=True)
    (tmp_path / "data" / "train" / "PNEUMONIA" / "person1_virus_1.png").write_bytes(_png(90))
    with pytest.raises(DataError, match="class folder is empty: .*NORMAL"):
        prepare(str(tmp_path / "data"), tmp_path / "cache", 64)


def test_class_folders_without_splits_and_rgb_inputs(tmp_path):
    root = tmp_path / "data"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            rgb = np.repeat(np.random.default_rng(i + 100 * len(cls)).integers(0, 255, (80, 80, 1), dtype=np.uint8), 3, axis=2)
            Image.fromarray(rgb).save(root / cls / f"{cls.lower()}{i}.jpg")
    result = prepare(str(root), tmp_path / "cache", 64, SplitFractions(0.2, 0.0, 0), workers=1)
    assert result.summary["kept"] == 20
    assert result.summary["unparsed_patient_ids"] == 20  # each file is its own patient, and we say so


def test_an_interrupted_prepare_leaves_no_cache_that_loads(tmp_path, monkeypatch):
    """summary.json marks a complete cache: a run stopped part-way over an earlier cache must not leave the old
    summary beside new images, nor a truncated images.npy that loads."""
    import model.data as data
    from model.data import CachedData

    root = _synthetic_kaggle(tmp_path / "data")
    cache = tmp_path / "cache"
    prepare(str(root), cache, 64, SplitFractions(0.2, 0.0, 0), workers=1)
    assert len(CachedData.load(cache).manifest) == 24

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # stopped while writing the manifest, after images.npy
    monkeypatch.setattr(data, "_write_csv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(root), cache, 64, SplitFractions(0.2, 0.0, 0), workers=1)
    with pytest.raises(DataError, match="incomplete .*run it again"):
        CachedData.load(cache)
    monkeypatch.undo()

    prepare(str(root), cache, 64, SplitFractions(0.2, 0.0, 0), workers=1)
    images = cache / "images.npy"
    images.write_bytes(images.read_bytes()[:len(images.read_bytes()) // 2])  # a disk that filled up
    with pytest.raises(DataError, match="incomplete"):
        CachedData.load(cache)


def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 8), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 64, 64), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1)
    np.savez(tmp_path / "pneumoniamnist_64.npz", **arrays)
    result = prepare(str(tmp_path), tmp_path / "cache", 64, SplitFractions(0.2, 0.0, 0), workers=1)
    assert result.summary["kept"] == 56
    assert result.summary["splits"]["test"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert result.summary["splits"]["sanity"] == {"NORMAL": 4, "PNEUMONIA": 4}


def test_real_images_split_without_patient_leakage(tmp_path, shared_224):
    root = make_kaggle_subset(tmp_path / "data", per_class=60)
    result = prepare(str(root), tmp_path / "cache", 64, SplitFractions(0.2, 0.1, 3), workers=2)
    leakage = result.summary["leakage"]
    assert leakage["patients_train_and_val"] == 0 and leakage["patients_train_and_holdout"] == 0
    assert result.summary["unparsed_patient_ids"] == 0
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert 0.3 < summary["preprocess"]["mean"] < 0.7  # normalisation statistics come from the train split

