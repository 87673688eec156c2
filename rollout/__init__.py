"""Canary rollouts of model versions: ``pneumoscope rollout canary|status|analyze|promote|rollback|history``
(and ``serve-local``, the local canary those drive with ``--local``).

- ``inferenceservice``: what a rollout changes in a KServe InferenceService (pure functions on its dict);
- ``cluster``: the InferenceService through the Kubernetes API (CustomObjectsApi), waiting for KServe;
- ``versions``: the MLflow side: checks before a rollout, the ``champion`` alias, history tags;
- ``local``: the same rollout on one machine: its state document, all that ``rollout ... --local`` needs;
- ``local_canary``: the runner behind it (``rollout serve-local``): two serving stacks behind a real nginx
  splitting by weight; the one module here that imports ``serving``;
- ``analysis``: canary vs stable from Prometheus, with a verdict;
- ``controller``: the transitions (refusals, order of steps, idempotent re-runs) over either backend.
"""
