# The Kubeflow pipeline image: every step of pneumonia-training runs here as
# `python3 -m kfp.dsl.executor_main` with the project and its pinned dependencies preinstalled;
# nothing is installed when a step runs (and the image has no pip to try).
#
# CUDA: PyPI's Linux torch wheels carry the CUDA runtime and cuDNN (nvidia-* wheels); the GPU node's
# driver comes in through the NVIDIA container toolkit, so a slim Python base is enough.
#
#   docker build -f docker/pipeline.Dockerfile \
#       --build-arg PNEUMOSCOPE_GIT_COMMIT="$(git rev-parse HEAD)" \
#       -t ghcr.io/pneumoscope/pipeline:0.1.0 .
#   pneumoscope pipeline compile --image ghcr.io/pneumoscope/pipeline:0.1.0

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN mkdir -p model components pipelines serving \
    && touch model/__init__.py components/__init__.py pipelines/__init__.py serving/__init__.py \
    && pip install --no-cache-dir . \
    && pip uninstall --yes pneumoscope
COPY model/ model/
COPY components/ components/
COPY pipelines/ pipelines/
COPY serving/ serving/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import components.steps, pipelines.pneumonia_training, model.training" \
    && pip uninstall --yes pip setuptools wheel

# ImageNet ResNet-50 weights (torchvision IMAGENET1K_V2) where model.network looks for them; the file
# name carries the first 8 hex digits of its SHA-256, checked here as torch.hub would.
ADD https://download.pytorch.org/models/resnet50-11ad3fa6.pth /opt/torch/hub/checkpoints/resnet50-11ad3fa6.pth
RUN python -c "import hashlib; p='/opt/torch/hub/checkpoints/resnet50-11ad3fa6.pth'; \
h=hashlib.sha256(open(p,'rb').read()).hexdigest(); assert h.startswith('11ad3fa6'), h"


FROM ${PYTHON_IMAGE}
ARG PNEUMOSCOPE_GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="pneumoscope pipeline" \
      org.opencontainers.image.source="https://github.com/pneumoscope/pneumoscope" \
      org.opencontainers.image.revision="${PNEUMOSCOPE_GIT_COMMIT}" \
      org.opencontainers.image.licenses="Apache-2.0"
# Non-root; group 0 owns what must be writable, so an arbitrary UID (OpenShift) works too. /gcs, /minio
# and /s3 are where older KFP launchers stage artifacts (newer ones mount emptyDirs there).
RUN useradd --uid 10001 --gid 0 --create-home --home-dir /home/pneumoscope --shell /usr/sbin/nologin pneumoscope \
    && mkdir -p /gcs /minio /s3 \
    && chown 10001:0 /gcs /minio /s3 \
    && chmod 0775 /gcs /minio /s3 /home/pneumoscope \
    && rm -rf /usr/local/lib/python3.11/site-packages/pip /usr/local/bin/pip*
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/torch /opt/torch
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/pneumoscope \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NO_ALBUMENTATIONS_UPDATE=1 \
    TORCH_HOME=/opt/torch \
    MPLCONFIGDIR=/tmp/matplotlib \
    PNEUMOSCOPE_HOME=/tmp/pneumoscope \
    PNEUMOSCOPE_GIT_COMMIT=${PNEUMOSCOPE_GIT_COMMIT}
USER 10001
WORKDIR /home/pneumoscope
CMD ["pneumoscope", "--help"]
