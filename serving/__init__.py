"""Serving: KServe predictor + transformer for pneumoscope models, the local stack, a client.

- ``predictor.py`` / ``predictor_main.py``: one pinned model version and everything that depends on
  it -- the version's resize + normalisation, ONNX Runtime with dynamic batching, calibration, the
  threshold; Open Inference Protocol v2 (stage-1 pixels in; probability, label, threshold, logit, cam
  and ``model_version`` out).
- ``transformer.py`` / ``transformer_main.py``: the version-agnostic REST v1/v2 and gRPC v2 front (model
  name ``pneumonia``): bounded decoding through ``model.preprocessing``, the X-ray gate, one predictor
  call per request, the heatmap PNG.
- kserve's ModelServer hardened, one module per job (no repository endpoints, admission control,
  deadlines, drain on SIGTERM, one-line errors): ``model_server.py`` (lifecycle), ``rest_server.py``,
  ``grpc_server.py``, ``dataplane.py`` (binary requests through ``model.wire_format``, readiness),
  ``refusals.py`` + ``errors.py`` (what each refusal answers, logged once), ``admission.py``,
  ``server_logging.py``.
- ``stack.py``: ``pneumoscope serve`` (both processes on loopback); ``client.py``: ``pneumoscope predict``.

No torch anywhere here: the serving image does not ship it. Design notes: ``docs/design.md``.
"""
