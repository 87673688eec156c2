"""Canary rollouts of model versions: ``pneumoscope rollout canary|status|analyze|promote|rollback|history``.

- ``inferenceservice``: what a rollout changes in a KServe InferenceService (pure functions on its dict);
- ``cluster``: the InferenceService through the Kubernetes API (CustomObjectsApi), waiting for KServe;
- ``versions``: the MLflow side: checks before a rollout, the ``champion`` alias, history tags;
- ``local``: the same rollout on one machine: two serving stacks behind a real nginx splitting by weight;
- ``analysis``: canary vs stable from Prometheus, with a verdict;
- ``controller``: the transitions (refusals, order of steps, idempotent re-runs) over either backend.
"""
