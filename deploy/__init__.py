"""Deployment tooling: the helm and kubectl binaries the project pins, and the generator of manifests/.

``helm/pneumoscope`` is the one source of truth for what a cluster runs; ``manifests/base`` and
``manifests/components`` are rendered from it (``make manifests`` = ``python -m deploy.manifests``).
"""
