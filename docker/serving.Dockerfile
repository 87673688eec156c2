# The KServe transformer and predictor: one image, two entry points.
#
#   pneumoscope-predictor   (= python -m serving.predictor_main)   ONNX Runtime or OpenVINO, one pinned model version
#   pneumoscope-transformer (= python -m serving.transformer_main) decode, gate, heatmap; calls the predictor
#
# Only the `serve` extra is installed: ONNX Runtime, OpenVINO, kserve, pydicom, Pillow; no torch (checked below).
# Build with docker/build.sh (or `make images`), which passes the host's CA bundle and pip index
# settings as build secrets; they never end up in a layer.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_DEFAULT_TIMEOUT=120
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes (README.md, which
# pyproject.toml names, is a stub here and comes with the code).
COPY pyproject.toml ./
RUN --mount=type=secret,id=hostca --mount=type=secret,id=pipconf --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/hostca ]; then export PIP_CERT=/run/secrets/hostca; fi; \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    mkdir -p model serving && touch README.md model/__init__.py serving/__init__.py \
    && pip install './[serve]' \
    && pip uninstall --yes pneumoscope
COPY README.md ./
COPY model/ model/
COPY serving/ serving/
# Test suites shipped inside wheels (pandas alone: ~50 MB) are never imported. OpenVINO keeps what the
# predictor runs (the core, the CPU plugin, the ONNX and IR frontends, TBB): 180 -> ~100 MB without the
# GPU/NPU/AUTO/HETERO/BATCH plugins, the other frameworks' frontends (and their Python wrappers), the C API,
# the conversion tools, the GPU kernel cache and headers.
# botocore keeps the service models of S3 (model artifacts) and STS/SSO (credentials): 27 -> ~2 MB.
# Bytecode: pip compiles every module of every dependency (~100 MB); it is dropped and written again by
# importing both servers and both engines, so the modules they start with have it (the running container
# cannot write it: read-only root; imports dominate cold start) and the rest do not.
RUN pip install --no-deps --no-build-isolation --no-cache-dir . \
    && pip uninstall --yes pip setuptools wheel \
    && find /opt/venv/lib/python3.11/site-packages -mindepth 2 -maxdepth 3 -type d -name tests -prune -exec rm -rf {} + \
    && ov=/opt/venv/lib/python3.11/site-packages/openvino \
    && rm -rf "$ov"/include "$ov"/libs/cache.json "$ov"/libs/libopenvino_intel_gpu_plugin.so \
              "$ov"/libs/libopenvino_intel_npu_plugin.so "$ov"/libs/libopenvino_auto_plugin.so \
              "$ov"/libs/libopenvino_auto_batch_plugin.so "$ov"/libs/libopenvino_hetero_plugin.so \
              "$ov"/libs/libopenvino_tensorflow_frontend.so* "$ov"/libs/libopenvino_tensorflow_lite_frontend.so* \
              "$ov"/libs/libopenvino_paddle_frontend.so* "$ov"/libs/libopenvino_pytorch_frontend.so* \
              "$ov"/libs/libopenvino_jax_frontend.so* "$ov"/libs/libopenvino_gguf_frontend.so* \
              "$ov"/libs/libopenvino_c.so* "$ov"/frontend/jax "$ov"/frontend/paddle "$ov"/frontend/pytorch \
              "$ov"/frontend/tensorflow "$ov"/tools "$ov"/torch \
    && find /opt/venv/lib/python3.11/site-packages/botocore/data -mindepth 1 -maxdepth 1 -type d \
            ! -name s3 ! -name sts ! -name sso ! -name sso-oidc -exec rm -rf {} + \
    && find /opt/venv -name __pycache__ -type d -prune -exec rm -rf {} + \
    && python3 -c "import serving.predictor_main, serving.transformer_main, serving.engine_selection, onnxruntime, openvino, model.registry" \
    && python3 -c "import openvino as ov; assert 'CPU' in ov.Core().available_devices, 'OpenVINO has no CPU plugin'" \
    && python3 -c "import boto3; [boto3.client(s, region_name='us-east-1') for s in ('s3', 'sts')]" \
    && python3 -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch must not be in the serving image'"


FROM ${BASE_IMAGE}
# Non-root; group 0 so that an arbitrary UID (OpenShift) works too. The base image's own pip goes.
RUN useradd --uid 10001 --gid 0 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pneumoscope \
    && rm -rf /usr/local/lib/python3.11/site-packages/pip /usr/local/bin/pip*
COPY --from=build /opt/venv /opt/venv
# Declared after the heavy layers: a new commit or version only rewrites labels and environment.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="pneumoscope serving" \
      org.opencontainers.image.description="KServe transformer and ONNX Runtime predictor for pneumonia detection on chest X-rays" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/pneumoscope/pneumoscope" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# The root filesystem may be read-only (Kubernetes): everything written goes under /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PNEUMOSCOPE_HOME=/tmp/pneumoscope \
    PNEUMOSCOPE_GIT_COMMIT=${GIT_COMMIT} \
    PNEUMOSCOPE_HEALTH_PORT=8080
USER 10001
WORKDIR /tmp
EXPOSE 8080 8081
# Docker's own health check (Kubernetes uses the probes in manifests/): the REST server answers.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['PNEUMOSCOPE_HEALTH_PORT'] + '/v2/health/live', timeout=2)"]
CMD ["pneumoscope-predictor", "--help"]
