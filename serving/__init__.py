"""Serving: KServe predictor + transformer for pneumoscope models, the local stack, a client.

- ``predictor.py`` / ``predictor_main.py``: ONNX Runtime behind kserve, one pinned model version,
  Open Inference Protocol v2 (FP32 tensor in; ``logit`` and ``cam`` out), dynamic batching.
- ``transformer.py`` / ``transformer_main.py``: REST v1/v2 and gRPC v2 front (model name
  ``pneumonia``): decode through ``model.preprocessing``, refuse non-X-rays, call the predictor,
  return probability, label, threshold and, on request, a heatmap PNG.
- ``stack.py``: ``pneumoscope serve`` (both processes on loopback); ``client.py``: ``pneumoscope predict``.

No torch anywhere here: the serving image does not ship it.
"""
