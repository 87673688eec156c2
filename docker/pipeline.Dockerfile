# The Kubeflow pipeline image: every step of pneumonia-training runs here as
# `python3 -m kfp.dsl.executor_main` with the project and the `train` extra preinstalled (CUDA torch);
# nothing is installed when a step runs (and the image has no pip to try).
#
# CUDA: PyPI's Linux torch wheels carry the CUDA runtime and cuDNN (nvidia-* wheels); the GPU node's
# driver comes in through the NVIDIA container toolkit, so a slim Python base is enough.
#
#   make images IMAGES=pipeline REGISTRY=registry.example.org/pneumoscope TAG=0.1.0
#   (docker/build.sh passes the host's CA bundle and pip settings as build secrets)
#   pneumoscope pipeline compile --image registry.example.org/pneumoscope/pipeline:0.1.0

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
    mkdir -p model components pipelines && touch README.md \
    && touch model/__init__.py components/__init__.py pipelines/__init__.py \
    && pip install './[train]' \
    && pip uninstall --yes pneumoscope
COPY README.md ./
COPY model/ model/
COPY components/ components/
COPY pipelines/ pipelines/
RUN pip install --no-deps --no-build-isolation --no-cache-dir . \
    && python3 -c "import components.steps, pipelines.pneumonia_training, model.training" \
    && pip uninstall --yes pip setuptools wheel

# ImageNet ResNet-50 weights (torchvision IMAGENET1K_V2) where model.network looks for them; the file
# name carries the first 8 hex digits of its SHA-256, checked here as torch.hub would. An empty
# RESNET50_WEIGHTS_URL (a machine that cannot reach download.pytorch.org) leaves them out: training
# then starts from random weights and says so in its log.
ARG RESNET50_WEIGHTS_URL=https://download.pytorch.org/models/resnet50-11ad3fa6.pth
RUN mkdir -p /opt/torch/hub/checkpoints && if [ -n "$RESNET50_WEIGHTS_URL" ]; then \
    python3 -c "import hashlib, sys, urllib.request; p = '/opt/torch/hub/checkpoints/resnet50-11ad3fa6.pth'; \
urllib.request.urlretrieve(sys.argv[1], p); h = hashlib.sha256(open(p, 'rb').read()).hexdigest(); \
assert h.startswith('11ad3fa6'), h" "$RESNET50_WEIGHTS_URL"; fi


FROM ${BASE_IMAGE}
# Non-root; group 0 owns what must be writable, so an arbitrary UID (OpenShift) works too. /gcs, /minio
# and /s3 are where older KFP launchers stage artifacts (newer ones mount emptyDirs there).
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/pneumoscope --shell /usr/sbin/nologin pneumoscope \
    && mkdir -p /gcs /minio /s3 \
    && chown 10001:0 /gcs /minio /s3 \
    && chmod 0775 /gcs /minio /s3 /home/pneumoscope \
    && rm -rf /usr/local/lib/python3.11/site-packages/pip /usr/local/bin/pip*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/torch /opt/torch
# Declared after the heavy layers: a new commit or version only rewrites labels and environment.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="pneumoscope pipeline" \
      org.opencontainers.image.description="Kubeflow pipeline steps of pneumoscope: ingest, train (CUDA), evaluate, register" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/pneumoscope/pneumoscope" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/pneumoscope \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    TORCH_HOME=/opt/torch \
    MPLCONFIGDIR=/tmp/matplotlib \
    PNEUMOSCOPE_HOME=/tmp/pneumoscope \
    PNEUMOSCOPE_GIT_COMMIT=${GIT_COMMIT}
USER 10001
WORKDIR /home/pneumoscope
# A pipeline step is a batch process (KFP watches its exit code); this checks that the step runtime
# imports, which is what a broken image would fail first.
HEALTHCHECK --interval=60s --timeout=30s --start-period=10s --retries=1 \
    CMD ["python3", "-c", "import components.steps"]
CMD ["pneumoscope", "--help"]
