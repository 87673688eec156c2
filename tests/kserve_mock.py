"""A Kubernetes API server for the rollout tests: kmock's KubernetesEmulator plus KServe's controller.

Why kmock (PyPI ``kmock``, by the author of Kopf): it is a real HTTP server that speaks the Kubernetes
REST conventions (paths, verbs, Status errors, JSON merge patch with ``null`` deleting a key, watch), so
the code under test runs the real ``kubernetes`` client end to end: its configuration from a kubeconfig,
its serialisation, its ApiException on errors. The alternatives do not: ``mockernetes`` patches the client
in-process (the transport is never exercised), ``pytest-httpserver``/``responses`` know nothing of
Kubernetes, and a kind/k3d cluster cannot run here. What kmock does not have we add in a subclass:

- KServe's controller: after a spec change it bumps ``metadata.generation``, creates a revision per
  component and moves ``status`` through the conditions KServe writes (PredictorReady, TransformerReady,
  IngressReady, Ready: False while the new revision starts, then True) and
  ``status.components.<c>`` (latestCreatedRevision, latestReadyRevision, latestRolledoutRevision,
  previousRolledoutRevision, traffic [{revisionName, percent, latestRevision, tag}]), honouring
  ``canaryTrafficPercent`` as KServe does (the latest revision gets that share, the last rolled-out one
  the rest; without it the latest takes 100 % and becomes the rolled-out revision);
- RBAC: verbs can be forbidden; a forbidden request is answered 403 with a Status BEFORE anything is
  stored (kmock itself records modifications even when a reaction answers).
"""

from __future__ import annotations

import asyncio
import copy
import threading
from datetime import datetime, timezone

import aiohttp.web
import kmock
import yaml

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
VERBS = {"FETCH": "get", "LIST": "list", "WATCH": "watch", "CREATE": "create", "UPDATE": "patch", "DELETE": "delete"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class KServeEmulator(kmock.KubernetesEmulator):
    """``ready_after_s``: how long a new revision takes to become ready; ``fail_revisions``: new revisions
    never become ready (an image that crashes); ``forbidden``: verbs answered 403."""

    ready_after_s: float = 0.3
    fail_revisions: bool = False
    forbidden: set

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.forbidden = set()
        self.revisions: dict[tuple, int] = {}

    async def _handle(self, request):
        verb = VERBS.get(getattr(request.action, "name", ""), "")
        if request.resource is not None and verb in self.forbidden:
            return aiohttp.web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                 "message": f'{PLURAL}.{GROUP} "{request.name}" is forbidden: User "ci-reader" cannot {verb} '
                            f'resource "{PLURAL}" in API group "{GROUP}" in the namespace "{request.namespace}"'},
                status=403)
        key = (request.resource, request.namespace, request.name)
        before = None
        if request.resource is not None and request.name and key in self.objects:
            before = copy.deepcopy(self.objects[key].raw.get("spec"))
        response = await super()._handle(request)
        if request.resource is not None and request.resource.plural == PLURAL and response.status < 300:
            if request.action.name == "CREATE":
                name = request.data["metadata"]["name"]
                namespace = request.namespace or request.data["metadata"].get("namespace")
                await self._spec_changed((request.resource, namespace, name))
            elif request.action.name == "UPDATE" and before is not None and self.objects[key].raw.get("spec") != before:
                await self._spec_changed(key, before)
        return response

    async def _spec_changed(self, key, before: dict | None = None) -> None:
        async with self._lock:
            obj = self.objects[key]
            generation = int(obj.raw.get("metadata", {}).get("generation", 0)) + 1
            spec, status = obj.raw["spec"], copy.deepcopy(obj.raw.get("status") or {})
            comps = status.setdefault("components", {})
            for name in ("predictor", "transformer"):
                if name not in spec:
                    continue
                # As Knative: a new revision only when the pod template changes; canaryTrafficPercent alone
                # only moves traffic between the existing revisions.
                old = {k: v for k, v in ((before or {}).get(name) or {}).items() if k != "canaryTrafficPercent"}
                new = {k: v for k, v in spec[name].items() if k != "canaryTrafficPercent"}
                if before is None or old != new or "latestCreatedRevision" not in comps.get(name, {}):
                    counter = (key[1], key[2], name)
                    n = self.revisions[counter] = self.revisions.get(counter, 0) + 1
                    comps.setdefault(name, {})["latestCreatedRevision"] = f"{key[2]}-{name}-{n:05d}"
            status["observedGeneration"] = generation
            status["conditions"] = self._conditions(spec, False, "RevisionMissing", "the new revision is starting")
            obj.patch({"metadata": {"generation": generation}, "status": status})
        asyncio.get_running_loop().create_task(self._reconcile(key, generation))

    @staticmethod
    def _conditions(spec: dict, ready: bool, reason: str = "", message: str = "") -> list[dict]:
        types = ["IngressReady", "PredictorReady"] + (["TransformerReady"] if "transformer" in spec else []) + ["Ready"]
        out = []
        for t in types:
            c = {"type": t, "status": "True" if ready else "False", "lastTransitionTime": _now()}
            if not ready:
                c.update(reason=reason, message=message)
            out.append(c)
        return out

    async def _reconcile(self, key, generation: int) -> None:
        await asyncio.sleep(self.ready_after_s)
        async with self._lock:
            obj = self.objects[key]
            if obj.raw.get("metadata", {}).get("generation") != generation:
                return  # a newer spec took over
            spec, status = obj.raw["spec"], copy.deepcopy(obj.raw["status"])
            if self.fail_revisions:
                status["conditions"] = self._conditions(spec, False, "RevisionFailed",
                                                        "Revision failed: container exited with code 1")
                obj.patch({"status": status})
                return
            for name in ("predictor", "transformer"):
                if name not in spec:
                    continue
                c = status["components"][name]
                latest = c["latestCreatedRevision"]
                c["latestReadyRevision"] = latest
                percent = spec[name].get("canaryTrafficPercent")
                rolled = c.get("latestRolledoutRevision")
                if percent is None or percent >= 100 or rolled is None:
                    if rolled and rolled != latest:
                        c["previousRolledoutRevision"] = rolled
                    c["latestRolledoutRevision"] = latest
                    c["traffic"] = [{"tag": "latest", "revisionName": latest, "percent": 100, "latestRevision": True}]
                else:
                    c["traffic"] = [{"tag": "latest", "revisionName": latest, "percent": percent,
                                     "latestRevision": True},
                                    {"tag": "prev", "revisionName": rolled, "percent": 100 - percent,
                                     "latestRevision": False}]
            status["conditions"] = self._conditions(spec, True)
            obj.patch({"status": status})


class KubeApi:
    """The emulator on a loopback port, its event loop in a thread; ``kubeconfig(path)`` writes a config."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self.thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes API mock did not start")

    async def _main(self):
        self._stop = asyncio.Event()
        async with KServeEmulator() as handler, kmock.Server(handler) as server:
            self.handler, self.url = handler, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def call(self, fn, *args):
        """Run ``fn(handler, *args)`` on the server's loop (the emulator is not thread-safe)."""
        async def run():
            return fn(self.handler, *args)
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def obj(self, namespace: str, name: str) -> dict:
        resource = kmock.resource(GROUP, VERSION, PLURAL)
        return self.call(lambda h: copy.deepcopy(h.objects[resource, namespace, name].raw))

    def set(self, **attrs) -> None:
        def apply(h):
            for k, v in attrs.items():
                setattr(h, k, v)
        self.call(apply)

    def kubeconfig(self, path, user: str = "alice", context: str = "test") -> str:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "mock", "cluster": {"server": self.url}}],
            "users": [{"name": user, "user": {"token": "not-checked"}}],
            "contexts": [{"name": context, "context": {"cluster": "mock", "user": user}}]}))
        return str(path)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)
