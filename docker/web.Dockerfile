# The doctor's web app (webapp/, FastAPI): `pneumoscope web --host 0.0.0.0 --port 8000`; the same image runs the DICOM
# gateway (gateway/): `pneumoscope gateway`, which records into the web app's database.
# Only the `web` and `gateway` extras are installed: no torch, kserve or onnxruntime. Both call the transformer over
# HTTP (PNEUMOSCOPE_INFERENCE_URL) and keeps studies in PNEUMOSCOPE_DATABASE_URL / PNEUMOSCOPE_IMAGE_STORE.
# Build with docker/build.sh (or `make images`), which passes the host's CA bundle and pip index
# settings as build secrets.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_DEFAULT_TIMEOUT=120
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# setuptools builds the project offline in the next stage (--no-build-isolation); unlike the serving
# extra (grpcio-tools), nothing in the web extra brings it.
# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes (README.md, which
# pyproject.toml names, is a stub here and comes with the code).
COPY pyproject.toml ./
RUN --mount=type=secret,id=hostca --mount=type=secret,id=pipconf --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/hostca ]; then export PIP_CERT=/run/secrets/hostca; fi; \
    if [ -s /run/secrets/pipconf ]; then export PIP_CONFIG_FILE=/run/secrets/pipconf; fi; \
    mkdir -p model webapp gateway && touch README.md model/__init__.py webapp/__init__.py gateway/__init__.py \
    && pip install './[web,gateway]' setuptools==84.2.1 \
    && pip uninstall --yes pneumoscope
# model/ carries the `pneumoscope` command line and the v2 wire format the app speaks (model/wire_format.py).
COPY README.md ./
COPY model/ model/
COPY webapp/ webapp/
COPY gateway/ gateway/
RUN pip install --no-deps --no-build-isolation --no-cache-dir . \
    && pip uninstall --yes pip setuptools wheel \
    && python3 -m compileall -q -j 0 /opt/venv/lib >/dev/null \
    && python3 -c "import webapp, gateway.service" \
    && python3 -c "import importlib.util as u; bad = [m for m in ('torch', 'kserve', 'onnxruntime') if u.find_spec(m)]; assert not bad, bad"


FROM ${BASE_IMAGE}
RUN useradd --uid 10001 --gid 0 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin pneumoscope \
    && rm -rf /usr/local/lib/python3.11/site-packages/pip /usr/local/bin/pip*
COPY --from=build /opt/venv /opt/venv
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="pneumoscope web" \
      org.opencontainers.image.description="The pneumoscope web app: chest X-ray studies, model answers and heatmaps for radiologists" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/pneumoscope/pneumoscope" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PNEUMOSCOPE_HOME=/tmp/pneumoscope \
    PNEUMOSCOPE_GIT_COMMIT=${GIT_COMMIT}
USER 10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["pneumoscope", "web", "--host", "0.0.0.0", "--port", "8000"]
