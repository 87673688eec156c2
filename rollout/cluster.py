"""The InferenceService through the Kubernetes API: the real ``kubernetes`` client (CustomObjectsApi).

Credentials: a kubeconfig (``--context``, ``KUBECONFIG``, ``~/.kube/config``) or, inside a pod, the
service account. Every API failure becomes one :class:`RolloutError` line naming the API server's URL
and the cause (unreachable, forbidden with the identity that was refused, not found).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from rollout import inferenceservice as isvc_
from rollout.errors import RolloutError
from rollout.settings import RolloutSettings

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


class ClusterBackend:
    """One InferenceService: read, merge-patch, wait for KServe."""

    where = "cluster"

    def __init__(self, settings: RolloutSettings):
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException

        self.settings = settings
        self.namespace, self.name = settings.namespace, settings.inference_service
        kubeconfig = settings.kubeconfig or os.path.expanduser("~/.kube/config")
        try:
            if settings.kube_context or Path(kubeconfig.split(os.pathsep)[0]).is_file():
                api_client = config.new_client_from_config(config_file=kubeconfig, context=settings.kube_context)
                contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
                if settings.kube_context:
                    active = next((c for c in contexts if c["name"] == settings.kube_context), active)
                ctx = active.get("context") or {}
                self.identity = f"{ctx.get('user', '?')}@{active.get('name', '?')}"
            else:
                config.load_incluster_config()
                api_client = client.ApiClient()
                self.identity = f"serviceaccount@{socket.gethostname()}"
        except (ConfigException, OSError, ValueError) as exc:
            raise RolloutError(f"no Kubernetes credentials: {str(exc).splitlines()[0]} (kubeconfig {kubeconfig}, "
                               f"context {settings.kube_context or 'current'})") from None
        api_client.configuration.retries = 1  # an unreachable API server fails in seconds, not minutes
        self.url = api_client.configuration.host
        self.api = client.CustomObjectsApi(api_client)

    # -- API calls, each failure one line -------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        from kubernetes.client.rest import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(GROUP, VERSION, self.namespace, PLURAL, *args, _request_timeout=30, **kwargs)
        except ApiException as exc:
            message = _status_message(exc)
            if exc.status == 403:
                raise RolloutError(f"forbidden: {self.identity} may not {what} inferenceservices in namespace "
                                   f"{self.namespace} at {self.url}: {message}") from None
            if exc.status == 404:
                raise RolloutError(f"InferenceService {self.namespace}/{self.name} not found at {self.url} "
                                   f"(is KServe installed and the chart deployed? --namespace/--name)") from None
            if exc.status == 409:
                raise RolloutError(f"conflict while trying to {what} {self.namespace}/{self.name}: {message}; "
                                   "someone else changed it, run the command again") from None
            raise RolloutError(f"the Kubernetes API at {self.url} refused to {what} "
                               f"{self.namespace}/{self.name}: HTTP {exc.status} {message}") from None
        except (HTTPError, OSError) as exc:
            cause = str(getattr(exc, "reason", None) or exc).splitlines()[0][:200]
            raise RolloutError(f"cannot reach the Kubernetes API at {self.url}: {cause}") from None

    def read(self) -> dict:
        return self._call("get", self.api.get_namespaced_custom_object, self.name)

    def apply(self, spec: dict | None = None, annotations: dict | None = None) -> dict:
        """One JSON merge patch (None removes a key): the spec change and its record land together or not at all."""
        body: dict = {}
        if spec:
            body["spec"] = spec
        if annotations:
            body["metadata"] = {"annotations": annotations}
        return self._call("patch", self.api.patch_namespaced_custom_object, self.name, body)

    def wait(self, percent: int | None, progress: Callable[[str], None], timeout_s: float | None = None) -> dict:
        """Until KServe reports the latest revision Ready with ``percent`` of the traffic (None: 100)."""
        timeout_s = self.settings.timeout_s if timeout_s is None else timeout_s
        return isvc_.wait_until_rolled_out(self.read, percent, progress, timeout_s, self.settings.poll_s)

    def describe(self) -> str:
        return f"InferenceService {self.namespace}/{self.name} at {self.url}"

    def needs_storage_uri(self, current: dict) -> bool:
        spec = current.get("spec") or {}
        return any(env.get("name") == "STORAGE_URI"
                   for c in isvc_.components(current) for container in spec[c].get("containers") or []
                   for env in container.get("env") or [])


def _status_message(exc) -> str:
    import json

    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason or exc.body or "")[:200]
