# A KServe Modelcar: one registered model version's bundle under /models, nothing else.
#
# Built by `pneumoscope export-modelcar models:/NAME/N` (serving/modelcar.py), which fills the build context's
# models/ with exactly the bundle's files (verified against the registry's bundle_sha256) and labels the image
# with the model name, version and digest. KServe runs it as a sidecar of the predictor that links /models into
# /mnt/models through the shared process namespace, so its base needs sh, ln and sleep: the serving image's base,
# whose layers a node has already pulled for the predictor.

ARG BASE_IMAGE=python:3.11.14-slim-bookworm
FROM ${BASE_IMAGE}
# Owned by root, readable by anyone: the predictor (another UID) reads it and can change nothing.
COPY --chown=0:0 --chmod=0555 models/ /models/
# The sidecar runs as KServe's uidModelcar (the chart's docs: the serving image's 10001), or this user.
USER 10001
HEALTHCHECK --interval=60s --timeout=3s CMD ["test", "-d", "/models"]
CMD ["sh", "-c", "ls /models >/dev/null && sleep infinity"]
