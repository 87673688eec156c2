"""Prometheus metrics of the transformer and the predictor.

They live in prometheus_client's default registry, which kserve's ``/metrics`` endpoint exposes next
to its own stage histograms (``request_preprocess_seconds``, ``request_predict_seconds``,
``request_postprocess_seconds``, ``request_explain_seconds``). One worker per process: with
``--workers 2`` each worker would own half of the counts.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Counted by the predictor, which decides: each side of a canary reports its own version's answers.
PREDICTIONS = Counter("pneumoscope_predictions_total", "images classified, by model version and predicted label",
                      ["model_name", "model_version", "label"])
PROBABILITY = Histogram("pneumoscope_probability", "calibrated pneumonia probability of classified images",
                        ["model_name", "model_version"], buckets=[i / 10 for i in range(1, 11)])
DECISIONS = Counter("pneumoscope_decisions_total", "answers by model version and decision (PNEUMONIA, NORMAL, REFER)",
                    ["model_name", "model_version", "decision"])
REFER_REASONS = Counter("pneumoscope_refer_reasons_total", "reasons for REFER decisions (uncertain, "
                        "out_of_distribution, age_over_limit, intended_use_unknown: the predictor's; "
                        "view_not_frontal: the transformer's)",
                        ["model_name", "model_version", "reason"])
OOD_SCORE = Histogram("pneumoscope_ood_score", "out-of-distribution score of classified images (above 1: outside "
                      "the intended use)", ["model_name", "model_version"],
                      buckets=[0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5, 2, 3, 5, 10])
REJECTIONS = Counter("pneumoscope_input_rejections_total", "requests refused before inference, by reason "
                     "(bad input, overloaded, shutting_down, deadline_exceeded)", ["reason"])
INFLIGHT = Gauge("pneumoscope_inflight_requests", "inference requests this process is working on")
ADMISSION_LIMIT = Gauge("pneumoscope_admission_limit", "inference requests this process admits at once now: its "
                        "measured service rate times its latency budget, within its bounds")
SERVICE_RATE = Gauge("pneumoscope_service_rate", "requests this process completes per second of busy time (recent)")
ADMISSION_BUDGET = Gauge("pneumoscope_latency_budget_seconds", "the latency budget admission keeps requests within")
CANCELLED = Counter("pneumoscope_cancelled_requests_total", "requests dropped because the client went away")
MODEL_INFO = Gauge("pneumoscope_model_info", "the model version this process serves (value 1)",
                   ["model_name", "model_version", "model_uri", "bundle_sha256", "role", "precision"])
PREDICTOR_ERRORS = Counter("pneumoscope_predictor_errors_total", "failed calls from the transformer to the "
                           "predictor, by cause", ["cause"])

BATCH_SIZE = Histogram("pneumoscope_batch_size", "images per engine call (dynamic batching)",
                       buckets=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64])
BATCH_WAIT = Histogram("pneumoscope_batch_queue_seconds", "time a request waited in the batching queue",
                       buckets=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5])
ENGINE_RUNS = Counter("pneumoscope_engine_runs_total", "engine calls: wide (all threads, a lone request) or "
                      "narrow (one thread, one of several parallel streams)", ["mode"])
ENGINE_TIME = Histogram("pneumoscope_engine_seconds", "ONNX Runtime time per engine call",
                        buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10])
ENGINE_INFO = Gauge("pneumoscope_engine_info", "the inference engine and precision the predictor serves with "
                    "(value 1); selection: auto (measured here), reused (measured earlier on this kind of machine, "
                    "gated here) or forced", ["model_name", "model_version", "engine", "precision", "selection"])
ENGINE_CANDIDATE_SPEED = Gauge("pneumoscope_engine_candidate_images_per_second", "images/s of each eligible "
                               "engine x precision, measured at load under the predictor's saturated load",
                               ["engine", "precision"])
ENGINE_CANDIDATE_ELIGIBLE = Gauge("pneumoscope_engine_candidate_eligible", "1 if the engine x precision passed the "
                                  "engine parity gate at load, else 0", ["engine", "precision"])
ENGINE_SELECTION_SECONDS = Gauge("pneumoscope_engine_selection_seconds", "duration of the engine parity gate and "
                                 "timing at load")
ENGINE_TIMING_SECONDS = Gauge("pneumoscope_engine_timing_seconds", "part of the engine selection spent timing "
                              "candidates at load (0 when a choice recorded on this kind of machine was reused)")
WARMUP_SECONDS = Gauge("pneumoscope_warmup_seconds", "duration of the warm-up inference run before the "
                       "predictor reported ready")


# Every inference request as its client saw it (REST and gRPC), for the error ratio, the p99 and the traffic
# split per side of a canary (the scrape adds component and model_version). gRPC codes are counted as the
# HTTP status they map to (grpc-gateway's table), so one ``code=~"5.."`` selects failures of both.
REQUESTS = Counter("pneumoscope_requests_total", "inference requests answered, by protocol and HTTP status code",
                   ["protocol", "code"])
REQUEST_SECONDS = Histogram("pneumoscope_request_duration_seconds", "time from a request's arrival to its answer",
                            ["protocol"], buckets=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 5, 10, 30])
REFERENCE_SHARE = Gauge("pneumoscope_reference_pneumonia_share", "share of PNEUMONIA decisions evaluation measured "
                        "for the served version (its reference; the prediction-mix drift alert compares with it)",
                        ["model_name", "model_version"])
GRPC_TO_HTTP = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
                "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
                "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
                "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}


def count_request(protocol: str, code: int | str, seconds: float) -> None:
    REQUESTS.labels(protocol=protocol, code=str(code)).inc()
    REQUEST_SECONDS.labels(protocol=protocol).observe(seconds)


def set_model_info(name: str, version: str, uri: str, sha256: str, role: str, precision: str = "") -> None:
    MODEL_INFO.labels(model_name=name, model_version=str(version), model_uri=uri, bundle_sha256=sha256,
                      role=role, precision=precision).set(1)


def set_reference(name: str, version: str, reference: dict | None) -> None:
    """The version's reference PNEUMONIA share (model.evaluation.reference_distribution), if evaluation stored one."""
    if reference and reference.get("pneumonia_share") is not None:
        REFERENCE_SHARE.labels(model_name=name, model_version=str(version)).set(float(reference["pneumonia_share"]))


def reject_count(reason: str) -> None:
    REJECTIONS.labels(reason=reason).inc()
