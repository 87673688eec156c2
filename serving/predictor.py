"""The predictor: one immutable model version behind kserve, and everything that depends on it.

It owns the version: stage 2 of ``model.preprocessing`` (squash-resize to the version's size,
normalise with its mean/std), the engine, calibration (temperature + logit bias), the operating
threshold, and the decision (:class:`model.intended_use.DecisionRule`: the refer band, the
out-of-distribution detector of :mod:`model.ood` and the age limit). The transformer in front of it knows
no version; so whichever transformer sends a request, the answer is computed entirely by this version,
and names it.

Open Inference Protocol v2 (REST or gRPC), see :mod:`serving.protocol`:

- inputs ``pixels`` UINT8 [N,H,W] (stage-1 pixels, H,W <= 512), optionally ``sizes`` INT32 [N,2]
  (each image's height and width on its canvas) and ``ages`` FP32 [N] (patient age in years, negative
  when unknown); the request parameter ``preprocessing`` names the stage-1 definition the pixels come
  from and must be the one this version was trained with;
- outputs ``probability`` FP32 [N], ``label`` BYTES [N], ``threshold`` FP32 [N], ``logit`` FP32 [N],
  ``cam`` FP32 [N,h,w], ``decision`` BYTES [N] (PNEUMONIA | NORMAL | REFER), ``ood_score`` FP32 [N]
  (NaN for a version without a detector), ``in_intended_use`` BOOL [N], ``refer_reasons`` BYTES [N]
  (a JSON list of ``{"code", "text"}`` per image); the response's ``model_version`` and its parameter
  ``intended_use`` (JSON: profile, demonstration, population, age limit, registered figures).

The out-of-distribution score comes from the graph's third output (layer1's channel statistics): one
[N,512] x [512,512] product per batch, no second inference.

Where the evidence falls (:mod:`model.lung_fields`): ``lung_share`` FP32 [N] (the share of the positive CAM
mass inside the lungs; -1 when the CAM has none), ``lung_mask`` UINT8 [N,128,128] (1 on the lungs, in the
stage-1 image squashed to a square: row r covers rows r*H/128.. of the image), ``lung_mask_source`` BYTES [N]
(``segmentation`` from the bundle's U-Net, or ``ellipse_prior``: the two lung-field ellipses of
:func:`model.quality.lung_fields` for a bundle without one) and ``input_box``
FP32 [N,4] (top, left, bottom, right, fractions of the stage-1 image: what the model input, and so the CAM,
covers; [0,0,1,1] unless the version crops to the lungs).

Concurrent requests are batched server-side (:mod:`serving.batching`). Ready only after a warm-up
inference. No torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from kserve import Model
from kserve.protocol.infer_type import InferRequest, InferResponse

from model.bundle import BundleError
from model.intended_use import DecisionRule
from model.lung_fields import SEGMENTATION_SIZE, LungSegmenter, crop, lung_share, resize_mask
from model.ood import OodDetector
from model.preprocessing import DECODED_MAX_SIDE, lung_view, normalize
from model.quality import lung_fields
from model.registry import fetch_model
from serving import engine_choice
from serving.admission import deadline
from serving.batching import DynamicBatcher
from serving.engine_selection import select_engine
from serving import predictor_inputs
from serving.metrics import (DECISIONS, OOD_SCORE, PREDICTIONS, PROBABILITY, REFER_REASONS, WARMUP_SECONDS,
                             set_model_info, set_reference)
from serving.protocol import AGES, INTENDED_USE_PARAMETER, MODEL_DIGEST_PARAMETER, PIXELS, SIZES, tensor_output
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

LABELS = ("NORMAL", "PNEUMONIA")
#: Above this many images, stage 2 (resize + normalise) runs in a worker thread, off the event loop.
INLINE_RESIZE_IMAGES = 4
#: the download folders of predictors started without a model cache, named for their process:
#: ``pneumoscope-predictor-<pid>-<random>`` in the temporary folder
DOWNLOAD_PREFIX = "pneumoscope-predictor-"


def remove_stale_downloads(parent: str | None = None) -> list[str]:
    """Remove the download folders of predictors that died while loading (a SIGKILL or an OOM kill runs no
    ``finally``), so that a container restarting in a /tmp that survives it (an emptyDir) does not pile up one copy
    of the model per crash. A folder is stale when its process is gone, or when it names this process: a
    restarted container's predictor is PID 1 again, and this one has made no folder yet. Returns the names
    removed."""
    import shutil

    parent = Path(parent or tempfile.gettempdir())
    removed = []
    for folder in parent.glob(f"{DOWNLOAD_PREFIX}*-*"):
        pid = folder.name.removeprefix(DOWNLOAD_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir() or (int(pid) != os.getpid() and _process_exists(int(pid))):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder.name)
    if removed:
        log.warning("removed %d download folder(s) left by predictors that died while loading: %s", len(removed),
                    ", ".join(removed))
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class PneumoniaPredictor(Model):
    """kserve model serving one pinned pneumoscope bundle."""

    platform = "onnxruntime_onnx"

    def __init__(self, name: str, model_uri: str, settings: ServingSettings | None = None):
        super().__init__(name)
        self.model_uri = model_uri
        self.settings = settings or ServingSettings()
        self.bundle = None
        self.session = None
        self.narrow = None
        self.batcher: DynamicBatcher | None = None
        self.model_version: str | None = None
        self.pinned_uri: str | None = None
        self.precision: str | None = None
        self.cam_shape: tuple[int, int] | None = None
        self.rule: DecisionRule | None = None
        self.detector = None
        self.intended_use_json = "{}"
        self.lungs = None  # the bundle's lung segmenter (model.lung_fields.LungSegmenter), if it has one
        # without one, the lung-field prior of model.quality (the web app's too): two ellipses, no mediastinum
        self._prior = lung_fields(SEGMENTATION_SIZE, SEGMENTATION_SIZE)

    # -- loading -------------------------------------------------------------------------------
    def load(self) -> bool:
        s = self.settings
        wait_for_model_folder(self.model_uri, s.model_wait_s)
        if s.model_cache:
            self._read_model(s.model_cache)
        else:
            # Every file is in memory (graphs, statistics) once read: a download folder of our own goes at once, so
            # a container that restarts does not pile up one copy of the model per start in its /tmp.
            remove_stale_downloads()
            with tempfile.TemporaryDirectory(prefix=f"{DOWNLOAD_PREFIX}{os.getpid()}-") as dest:
                self._read_model(dest)
        self.precision, self.platform = self.engine.precision, self.engine.platform
        self.session, self.narrow = self.engine.wide, self.engine.narrow
        self.image_size = self.config.image_size
        self.batcher = DynamicBatcher(self.run_narrow if self.narrow else self.run_engine, s.max_batch_size,
                                      s.max_batch_delay_ms / 1000.0, streams=s.streams(),
                                      run_wide=self.run_engine if self.narrow else None)
        self._warm_up()
        set_model_info(self.name, self.model_version, self.pinned_uri, self.model_digest, "predictor", self.precision)
        set_reference(self.name, self.model_version, self.bundle.meta.get("reference"))
        log.info("predictor ready: %s (version %s, %s %s, %d px, threshold %.4f, refer band %.4f-%.4f, age limit %g "
                 "years, out-of-distribution detector %s; %d threads, %d streams, batches of up to %d, delay %.1f ms)",
                 self.pinned_uri, self.model_version, self.engine.engine, self.precision, self.image_size,
                 self.threshold, self.rule.band_low, self.rule.band_high, self.rule.age_limit_years,
                 "on" if self.detector is not None else "absent", s.engine_threads(), s.streams(), s.max_batch_size,
                 s.max_batch_delay_ms)
        self.ready = True
        return self.ready

    def _read_model(self, dest: str) -> None:
        """Fetch the version into ``dest`` (a registry URI; a folder is read where it is) and build from its files
        everything the predictor serves with: decision rule, detector, lung segmenter, engines."""
        s = self.settings
        self.bundle, info = fetch_model(self.model_uri, dest, s.mlflow_tracking_uri, expected_sha256=s.model_sha256,
                                        require_digest=True)
        self.model_version, self.pinned_uri = str(info["version"]), info["uri"]
        self.model_digest = self.bundle.sha256  # checked against the expected digest just now; not hashed per answer
        self.config = self.bundle.preprocess  # BundleError (one line at start) for an unusable version
        self.threshold = self.bundle.threshold
        self.rule = DecisionRule.from_meta(self.bundle.meta)
        self.detector = OodDetector.load(self.bundle)
        self.intended_use_json = json.dumps(self.rule.summary, separators=(",", ":"), sort_keys=True)
        if self.detector is None:
            log.warning("model version %s carries no out-of-distribution detector (exported before it existed): every "
                        "answer is REFER, reason intended_use_unknown; re-export the model", self.model_version)
        # One thread: it runs per image, beside the engine's threads, in the same call as the classifier.
        self.lungs = LungSegmenter.from_bundle(self.bundle, threads=1)
        if self.config.lung_crop != "none" and self.lungs is None:
            raise BundleError(f"version {self.model_version} was trained on lung-cropped films "
                              f"({self.config.lung_crop}) but its bundle holds no lung segmentation model")
        # Engine x precision: gated for accuracy and timed on this machine (serving.engine_selection). Under
        # load, single-threaded runs go side by side on the narrow engine.
        self.engine = select_engine(self.bundle, s, self.name, self.model_version,
                                    choice=engine_choice.for_bundle(s, self.pinned_uri, self.model_digest))

    def _warm_up(self) -> None:
        """Run the batch sizes we will see first, so the first client does not pay for allocation."""
        size, started = self.image_size, time.perf_counter()
        for n in sorted({1, self.settings.max_batch_size}):
            logits, cams, features = self.run_engine(np.zeros((n, 1, size, size), dtype=np.float32))
            if self.narrow is not None:
                self.run_narrow(np.zeros((n, 1, size, size), dtype=np.float32))
        if logits.shape != (n,) or cams.ndim != 3 or not np.all(np.isfinite(logits)):
            raise RuntimeError(f"warm-up inference returned logit {logits.shape}, cam {cams.shape}")
        if self.detector is not None and features.shape != (n, self.detector.dimensions):
            raise RuntimeError(f"the graph's features are {list(features.shape)}; the out-of-distribution "
                               f"detector needs [{n}, {self.detector.dimensions}]")
        self.cam_shape = tuple(int(d) for d in cams.shape[1:])
        WARMUP_SECONDS.set(time.perf_counter() - started)

    def run_engine(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All intra-op threads on one batch."""
        return self._run(self.session, x)

    def run_narrow(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One thread; several of these run in parallel under load."""
        return self._run(self.narrow, x)

    @staticmethod
    def _run(session, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return session.run(x)

    def stop(self):
        if self.batcher:
            self.batcher.close()
        super().stop()

    # -- metadata ------------------------------------------------------------------------------
    def get_input_types(self) -> list[dict]:
        return [{"name": PIXELS, "datatype": "UINT8", "shape": [-1, -1, -1]},
                {"name": SIZES, "datatype": "INT32", "shape": [-1, 2]},
                {"name": AGES, "datatype": "FP32", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        h, w = self.cam_shape or (-1, -1)
        return [{"name": "probability", "datatype": "FP32", "shape": [-1]},
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "threshold", "datatype": "FP32", "shape": [-1]},
                {"name": "logit", "datatype": "FP32", "shape": [-1]},
                {"name": "cam", "datatype": "FP32", "shape": [-1, h, w]},
                {"name": "decision", "datatype": "BYTES", "shape": [-1]},
                {"name": "ood_score", "datatype": "FP32", "shape": [-1]},
                {"name": "in_intended_use", "datatype": "BOOL", "shape": [-1]},
                {"name": "refer_reasons", "datatype": "BYTES", "shape": [-1]},
                {"name": "lung_share", "datatype": "FP32", "shape": [-1]},
                {"name": "lung_mask", "datatype": "UINT8", "shape": [-1, SEGMENTATION_SIZE, SEGMENTATION_SIZE]},
                {"name": "lung_mask_source", "datatype": "BYTES", "shape": [-1]},
                {"name": "input_box", "datatype": "FP32", "shape": [-1, 4]}]

    # -- request checks ------------------------------------------------------------------------
    def limits(self) -> tuple[int, int]:
        """(most images per request, most pixels per side)."""
        return max(self.settings.max_images_per_request, self.settings.max_batch_size), DECODED_MAX_SIDE

    def precheck_grpc(self, request) -> None:
        predictor_inputs.precheck_grpc(request)

    def _check_preprocessing(self, request: InferRequest) -> None:
        predictor_inputs.check_preprocessing(request, self.model_version)

    def _images(self, request: InferRequest) -> list[np.ndarray]:
        return predictor_inputs.read_images(request, *self.limits())

    @staticmethod
    def _ages(request: InferRequest, n: int) -> np.ndarray:
        return predictor_inputs.read_ages(request, n)

    # -- inference -----------------------------------------------------------------------------
    def model_input(self, images: list[np.ndarray]) -> np.ndarray:
        """Stage 2 of the preprocessing, with this version's parameters: float32 [N,1,S,S]."""
        return self.model_inputs(images)[0]

    def model_inputs(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stage 2 (``model.preprocessing.lung_view``, lung crop included) and the lung masks: (float32 [N,1,S,S],
        bool lung masks [N,s,s] at the segmenter's size in each stage-1 image's squashed frame, input boxes [N,4])."""
        if self.lungs is not None:
            masks = np.stack([self.lungs.mask(im) for im in images])
        else:
            masks = np.broadcast_to(self._prior, (len(images), SEGMENTATION_SIZE, SEGMENTATION_SIZE))
        views = [lung_view(im, self.config, mask if self.lungs is not None else None)
                 for im, mask in zip(images, masks)]
        x = np.ascontiguousarray(normalize(np.stack([pixels for pixels, _ in views]), self.config))
        return x, masks, np.array([box for _, box in views], dtype=np.float32)

    @property
    def lung_mask_source(self) -> str:
        return "segmentation" if self.lungs is not None else "ellipse_prior"

    def lung_shares(self, cams: np.ndarray, masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """The CAM lung share of each image, in the model input's frame (the mask cropped to the input box)."""
        return np.array([lung_share(cam, crop(mask, tuple(float(b) for b in box)))
                         for cam, mask, box in zip(cams, masks, boxes)], dtype=np.float32)

    def calibrate(self, logits: np.ndarray) -> tuple[np.ndarray, list[str]]:
        probs = self.bundle.probability(logits).astype(np.float32)
        return probs, [LABELS[int(p >= self.threshold)] for p in probs]

    def ood_scores(self, features: np.ndarray) -> np.ndarray:
        """``ood_score`` [N] from the graph's third output (NaN without a detector)."""
        if self.detector is None:
            return np.full(len(features), np.nan, dtype=np.float32)
        return self.detector.scores(features).astype(np.float32)

    def decide(self, probs: np.ndarray, scores: np.ndarray, ages: np.ndarray) -> list:
        """The version's verdict per image (model.intended_use.DecisionRule)."""
        return [self.rule.decide(float(p), None if np.isnan(s) else float(s), None if np.isnan(a) else float(a))
                for p, s, a in zip(probs, scores, ages)]

    async def predict(self, payload, headers=None, response_headers=None) -> InferResponse:
        if not isinstance(payload, InferRequest):
            raise predictor_inputs.refuse("the predictor speaks Open Inference Protocol v2 (REST /v2/... or gRPC) only")
        self._check_preprocessing(payload)
        images = self._images(payload)
        ages = self._ages(payload, len(images))
        if len(images) > INLINE_RESIZE_IMAGES or self.lungs is not None:
            x, masks, boxes = await asyncio.to_thread(self.model_inputs, images)
        else:
            x, masks, boxes = self.model_inputs(images)
        logits, cams, features = await self.batcher.submit(x, deadline())
        # -1: no positive CAM mass to place (JSON has no NaN)
        shares = np.nan_to_num(self.lung_shares(cams, masks, boxes), nan=-1.0)
        if self.settings.test_delay_ms:
            await asyncio.sleep(self.settings.test_delay_ms / 1000.0)
        probs, labels = self.calibrate(logits)
        scores = self.ood_scores(features)
        verdicts = self.decide(probs, scores, ages)
        self._count(probs, labels, scores, verdicts)
        outputs = [tensor_output("probability", "FP32", probs),
                   tensor_output("label", "BYTES", np.array(labels, dtype=np.object_)),
                   tensor_output("threshold", "FP32", np.full(len(probs), self.threshold, dtype=np.float32)),
                   tensor_output("logit", "FP32", logits), tensor_output("cam", "FP32", cams),
                   tensor_output("decision", "BYTES", np.array([v.decision for v in verdicts], dtype=np.object_)),
                   tensor_output("ood_score", "FP32", scores),
                   tensor_output("in_intended_use", "BOOL", np.array([v.in_intended_use for v in verdicts])),
                   tensor_output("refer_reasons", "BYTES", np.array(
                       [json.dumps(v.reasons_json(), separators=(",", ":")) for v in verdicts], dtype=np.object_)),
                   tensor_output("lung_share", "FP32", shares),
                   tensor_output("lung_mask", "UINT8", np.stack([resize_mask(m, SEGMENTATION_SIZE, SEGMENTATION_SIZE)
                                                                 for m in masks]).astype(np.uint8)),
                   tensor_output("lung_mask_source", "BYTES",
                                 np.array([self.lung_mask_source] * len(images), dtype=np.object_)),
                   tensor_output("input_box", "FP32", boxes)]
        # The bundle's digest names exactly what computed the answer (the DICOM SR's algorithm identification).
        return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                             model_version=self.model_version, infer_outputs=outputs,
                             use_binary_outputs=payload.use_binary_outputs,
                             requested_outputs=payload.request_outputs,
                             parameters={INTENDED_USE_PARAMETER: self.intended_use_json,
                                         MODEL_DIGEST_PARAMETER: self.model_digest})

    def _count(self, probs: np.ndarray, labels: list[str], scores: np.ndarray, verdicts: list) -> None:
        version = dict(model_name=self.name, model_version=self.model_version)
        for p, label, score, verdict in zip(probs, labels, scores, verdicts):
            PREDICTIONS.labels(label=label, **version).inc()
            PROBABILITY.labels(**version).observe(float(p))
            DECISIONS.labels(decision=verdict.decision, **version).inc()
            for reason in verdict.refer_reasons:
                REFER_REASONS.labels(reason=reason.code, **version).inc()
            if np.isfinite(score):
                OOD_SCORE.labels(**version).observe(float(score))


def wait_for_model_folder(model_uri: str, timeout_s: float) -> None:
    """KServe starts a modelcar beside the predictor and says so with ``MODEL_INIT_MODE=async``: the folder
    (a link into the modelcar's root) appears when the sidecar has run; wait for it, then load as usual."""
    if os.environ.get("MODEL_INIT_MODE") != "async" or model_uri.startswith("models:/"):
        return
    folder, deadline = Path(model_uri.removeprefix("file://")), time.monotonic() + timeout_s
    while not folder.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not folder.exists():
        log.warning("the model folder %s did not appear within %.0f s (MODEL_INIT_MODE=async)", folder, timeout_s)

