"""The model bundle: what one registered model version carries, and how to run it.

A bundle is a directory::

    model.onnx            fp32 graph: input ``image`` [N,1,S,S] -> ``logit`` [N], ``cam`` [N,h,w],
                          ``features`` [N,512] (layer1's channel means and standard deviations; absent from
                          bundles exported before it existed)
    model.int8.onnx       optional static QDQ int8 graph (same inputs/outputs)
    gate.npz              optional engine parity gate: val images + fp32 reference outputs (model.engine_gate)
    ood.npz               the out-of-distribution detector's statistics (model.ood)
    lung.onnx             optional lung segmentation U-Net (model.lung_fields): the predictor runs it for the lung
                          mask, the CAM lung share and, for a version trained with ``lung_crop``, its input pixels
    pneumoscope.json      preprocessing, threshold, temperature + logit bias, refer band, metrics, int8 decision,
                          intended use (population, age limit, profile, registered figures, detector), sha256 of files

No torch here: the serving path (transformer, predictor) imports this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.preprocessing import PreprocessConfig, normalize

BUNDLE_FILE = "pneumoscope.json"
BUNDLE_FORMAT = 1
INPUT_NAME = "image"
OUTPUT_NAMES = ("logit", "cam", "features")


class BundleError(Exception):
    """A model bundle that is missing, malformed, or whose files do not match their hashes."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_digest(meta: dict) -> str:
    """SHA-256 of the bundle metadata (which holds every file's SHA-256), without its own digest field.

    This is the bundle's identity: the registry stores it as the model version's ``bundle_sha256``
    tag, and a server compares it with a digest it got from elsewhere (the tag, ``--sha256``), never
    with the value written inside the bundle, which anyone able to alter the bundle can rewrite.
    """
    body = json.dumps({k: v for k, v in meta.items() if k != "bundle_sha256"}, sort_keys=True).encode()
    return hashlib.sha256(body).hexdigest()


def write_bundle(directory: str | Path, meta: dict) -> Path:
    """Hash every ONNX graph and stored array file in ``directory`` and write ``pneumoscope.json``."""
    root = Path(directory)
    files = sorted(p.name for p in root.iterdir() if p.suffix in (".onnx", ".npz") and p.is_file())
    meta = dict(meta, format=BUNDLE_FORMAT, files={name: sha256_file(root / name) for name in files})
    # The bundle hash covers the ONNX files and every decision stored with them.
    meta["bundle_sha256"] = canonical_digest(meta)
    path = root / BUNDLE_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def find_bundle_dir(path: str | Path) -> Path:
    """The ONE bundle inside a downloaded MLflow model or a KServe ``/mnt/models`` mount."""
    root = Path(path)
    if (root / BUNDLE_FILE).is_file():
        return root
    found = sorted(root.rglob(BUNDLE_FILE))
    if not found:
        raise BundleError(f"no {BUNDLE_FILE} under {root}: not a pneumoscope model")
    if len(found) > 1:
        where = ", ".join(str(f.parent.relative_to(root)) for f in found[:4])
        raise BundleError(f"{len(found)} bundles under {root} ({where}): a model folder must hold exactly one")
    return found[0].parent


def is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass
class Bundle:
    root: Path
    meta: dict

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, expected_sha256: str | None = None) -> "Bundle":
        """Open a bundle. ``verify`` checks every file against the metadata (corruption); with
        ``expected_sha256`` the metadata itself must have that digest (tampering)."""
        root = find_bundle_dir(path)
        try:
            meta = json.loads((root / BUNDLE_FILE).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"cannot read {root / BUNDLE_FILE}: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"unsupported bundle format {meta.get('format') if isinstance(meta, dict) else None!r}")
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            raise BundleError(f"{BUNDLE_FILE} lists no files")
        for name, digest in files.items():
            # Bare names only: "../x" or "/etc/x" would make the server read outside the bundle.
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise BundleError(f"{BUNDLE_FILE} names the file {name!r}; only bare file names are allowed")
            if not is_sha256(digest):
                raise BundleError(f"{BUNDLE_FILE} gives no valid sha256 for {name}")
        bundle = cls(root, meta)
        if expected_sha256 is not None:
            bundle.check_digest(expected_sha256)
        if verify:
            bundle.verify()
        return bundle

    @property
    def digest(self) -> str:
        """The digest computed from the metadata as it is now."""
        return canonical_digest(self.meta)

    def check_digest(self, expected: str) -> None:
        expected = str(expected).strip().lower()
        if not is_sha256(expected):
            raise BundleError(f"the expected bundle digest {expected[:80]!r} is not a SHA-256 (64 hex digits)")
        if self.digest != expected:
            raise BundleError(f"bundle digest {self.digest[:12]}... does not match the expected {expected[:12]}...: "
                              "the model was altered or is not the version you meant")

    def verify(self) -> None:
        """Every listed file exists and has its listed SHA-256; the metadata matches its own digest."""
        if self.digest != self.meta.get("bundle_sha256"):
            raise BundleError("pneumoscope.json does not match its bundle_sha256: the metadata was altered")
        for name, expected in self.meta["files"].items():
            path = self.root / name
            if not path.is_file():
                raise BundleError(f"bundle file missing: {name}")
            if sha256_file(path) != expected:
                raise BundleError(f"sha256 mismatch for {name}: the artifact is corrupt or was altered")

    @property
    def preprocess(self) -> PreprocessConfig:
        try:
            return PreprocessConfig.from_dict(self.meta["preprocess"])
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"this model's preprocessing cannot be used: {exc}") from None

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def temperature(self) -> float:
        return float(self.meta.get("temperature", 1.0))

    @property
    def sha256(self) -> str:
        return self.digest

    def onnx_path(self, precision: str = "auto") -> Path:
        """``auto`` takes int8 only when it passed the int8 export gate."""
        if precision == "auto":
            precision = "int8" if self.meta.get("int8", {}).get("accepted") else "fp32"
        name = {"fp32": "model.onnx", "int8": "model.int8.onnx"}.get(precision)
        if name is None:
            raise BundleError(f"unknown precision {precision!r} (fp32, int8 or auto)")
        if name not in self.meta["files"]:
            raise BundleError(f"this model version has no {precision} graph")
        return self.root / name

    def arrays(self, name: str, what: str) -> dict[str, np.ndarray]:
        """The arrays of one hashed ``.npz`` file of this bundle; BundleError when it is unlisted or unreadable."""
        if name not in self.meta.get("files", {}):
            raise BundleError(f"{what} {name} is not covered by the bundle's hashes")
        try:
            with np.load(self.root / name, allow_pickle=False) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read {what} {name}: {exc}") from None

    @property
    def intended_use(self) -> dict:
        """What the version is for (population, age limit, profile, registered figures, detector); {} for a bundle
        exported before it was recorded."""
        return dict(self.meta.get("intended_use") or {})

    @property
    def logit_bias(self) -> float:
        return float(self.meta.get("logit_bias", 0.0))

    def probability(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probability: sigmoid(logit / temperature + logit_bias), both fitted on val."""
        z = np.asarray(logits, dtype=np.float64) / self.temperature + self.logit_bias
        return 1.0 / (1.0 + np.exp(-z))


def make_session(onnx_path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    from model.settings import available_cpus

    options.intra_op_num_threads = threads or available_cpus()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def run_images(session, images: np.ndarray, config: PreprocessConfig, batch_size: int = 32,
               with_cam: bool = False, with_features: bool = False):
    """uint8 (N, S, S) at the model resolution -> logits [N]; with ``with_cam`` and/or ``with_features`` a tuple
    (logits, [CAMs [N, h, w]], [features [N, d]]) in that order."""
    wanted = [OUTPUT_NAMES[0]] + ([OUTPUT_NAMES[1]] if with_cam else []) + ([OUTPUT_NAMES[2]] if with_features else [])
    collected: list[list[np.ndarray]] = [[] for _ in wanted]
    for start in range(0, len(images), batch_size):
        batch = normalize(np.asarray(images[start:start + batch_size]), config)
        for store, array in zip(collected, session.run(wanted, {INPUT_NAME: batch})):
            store.append(array)
    if not collected[0]:
        return np.zeros(0, np.float32) if len(wanted) == 1 else tuple(np.zeros(0, np.float32) for _ in wanted)
    logits = np.concatenate(collected[0]).reshape(-1)
    if len(wanted) == 1:
        return logits
    return (logits, *(np.concatenate(parts) for parts in collected[1:]))
