"""What a rollout changes in the KServe InferenceService, as pure functions on its JSON (a dict).

A revision pins one model version, in both components (transformer and predictor): the predictor's
``--model_uri=models:/NAME/N`` (or, with KServe's storage initializer, its ``STORAGE_URI`` and the
expected bundle digest), the transformer's too while it has one, and the label
``pneumoscope.io/model-version`` on each component, which KServe copies onto the pods (Prometheus reads
it from there). A canary is KServe's own: ``canaryTrafficPercent`` on both components sends that share
to the latest revision and the rest to the last fully rolled-out one.

The rollout's own state lives in annotations of the InferenceService, written in the same PATCH as the
spec, so that the cluster never holds a spec change without the record of it (and vice versa).
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable

COMPONENTS = ("predictor", "transformer")
VERSION_LABEL = "pneumoscope.io/model-version"
STABLE = "pneumoscope.io/stable-version"
CANARY = "pneumoscope.io/canary-version"
PENDING = "pneumoscope.io/rollout-pending"  # a step whose MLflow half is not done yet (see controller)
HISTORY = "pneumoscope.io/rollout-history"
HISTORY_KEEP = 50  # annotations are limited to 256 KiB in all; 50 entries are ~10 KiB

_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")


def annotations(isvc: dict) -> dict:
    return (isvc.get("metadata") or {}).get("annotations") or {}


def components(isvc: dict) -> list[str]:
    spec = isvc.get("spec") or {}
    return [c for c in COMPONENTS if c in spec]


def _model_uris(containers: list[dict]) -> list[str]:
    uris = []
    for container in containers or []:
        args = list(container.get("args") or [])
        for i, arg in enumerate(args):
            if arg.startswith("--model_uri="):
                uris.append(arg.split("=", 1)[1])
            elif arg == "--model_uri" and i + 1 < len(args):
                uris.append(args[i + 1])
    return uris


def pinned_version(component: dict, model_name: str) -> str | None:
    """The version a component's spec pins: its label, else a ``models:/NAME/N`` argument."""
    label = (component.get("labels") or {}).get(VERSION_LABEL)
    if label:
        return str(label)
    for uri in _model_uris(component.get("containers")):
        match = _URI.match(uri)
        if match and match["name"] == model_name:
            return match["version"]
    return None


def stable_version(isvc: dict, model_name: str) -> str | None:
    """The fully rolled-out version: the annotation, else what the predictor's spec pins (no canary yet)."""
    recorded = annotations(isvc).get(STABLE)
    if recorded:
        return recorded
    return pinned_version((isvc.get("spec") or {}).get("predictor") or {}, model_name)


def canary(isvc: dict) -> tuple[str | None, int | None]:
    """(canary version, percent) of a running canary, else (None, None)."""
    spec = isvc.get("spec") or {}
    percent = (spec.get("predictor") or {}).get("canaryTrafficPercent")
    version = annotations(isvc).get(CANARY)
    if version is None and percent is None:
        return None, None
    return version, percent


def pending(isvc: dict) -> dict | None:
    raw = annotations(isvc).get(PENDING)
    return json.loads(raw) if raw else None


def history(isvc: dict) -> list[dict]:
    raw = annotations(isvc).get(HISTORY)
    try:
        return json.loads(raw) if raw else []
    except json.JSONDecodeError:
        return []


def with_history(isvc: dict, entry: dict) -> str:
    return json.dumps((history(isvc) + [entry])[-HISTORY_KEEP:], separators=(",", ":"))


def repin(component: dict, model_name: str, version: str, storage_uri: str | None = None,
          sha256: str | None = None) -> dict:
    """The component's containers and labels pinned to ``version`` (nothing else changes)."""
    containers = copy.deepcopy(component.get("containers") or [])
    for container in containers:
        args = container.get("args")
        if args:
            container["args"] = [_repin_arg(arg, model_name, version) for arg in args]
            if sha256:  # the predictor's expected bundle digest (a folder's reference; checked against the tag)
                container["args"] = [f"--sha256={sha256}" if a.startswith("--sha256=") else a
                                     for a in container["args"]]
        for env in container.get("env") or []:
            if env.get("name") == "STORAGE_URI" and "value" in env:
                if storage_uri is None:
                    raise ValueError("the InferenceService pins its model with STORAGE_URI: the version's "
                                     "artifact location is needed")
                env["value"] = storage_uri
            elif env.get("name") == "PNEUMOSCOPE_MODEL_SHA256" and sha256:
                env["value"] = sha256
        if sha256 and any(e.get("name") == "STORAGE_URI" for e in container.get("env") or []) \
                and not any(e.get("name") == "PNEUMOSCOPE_MODEL_SHA256" for e in container.get("env") or []):
            container["env"].append({"name": "PNEUMOSCOPE_MODEL_SHA256", "value": sha256})
    labels = dict(component.get("labels") or {})
    labels[VERSION_LABEL] = str(version)
    return {"containers": containers, "labels": labels}


def _repin_arg(arg: str, model_name: str, version: str) -> str:
    for prefix in ("--model_uri=", ""):
        if arg.startswith(prefix):
            match = _URI.match(arg[len(prefix):])
            if match and match["name"] == model_name:
                return f"{prefix}models:/{model_name}/{version}"
    return arg


def spec_patch(isvc: dict, model_name: str, version: str, percent: int | None, storage_uri: str | None = None,
               sha256: str | None = None) -> dict:
    """spec changes pinning every component to ``version``; ``percent`` None = no canary (100 %)."""
    spec = isvc.get("spec") or {}
    out = {}
    for name in components(isvc):
        out[name] = repin(spec[name], model_name, version, storage_uri, sha256)
        out[name]["canaryTrafficPercent"] = percent  # None removes it (JSON merge patch)
    return out


def end_canary_patch(isvc: dict) -> dict:
    """Promote: the latest revision (the canary's spec) takes 100 %."""
    return {name: {"canaryTrafficPercent": None} for name in components(isvc)}


def conditions(isvc: dict) -> dict[str, dict]:
    return {c.get("type"): c for c in ((isvc.get("status") or {}).get("conditions") or [])}


def is_true(isvc: dict, condition: str) -> bool:
    return conditions(isvc).get(condition, {}).get("status") == "True"


def traffic(isvc: dict, component: str) -> list[dict]:
    return (((isvc.get("status") or {}).get("components") or {}).get(component) or {}).get("traffic") or []


def rollout_progress(isvc: dict, percent: int | None) -> tuple[bool, str]:
    """(done, what is missing): KServe has seen the spec, every component is ready, and the latest revision
    takes ``percent`` (None: 100) of each component's traffic."""
    want = 100 if percent is None else percent
    meta, status = isvc.get("metadata") or {}, isvc.get("status") or {}
    if "generation" in meta and status.get("observedGeneration", -1) < meta["generation"]:
        return False, f"KServe has not seen generation {meta['generation']} yet"
    missing = []
    for name in components(isvc):
        condition = conditions(isvc).get(f"{name.capitalize()}Ready", {})
        if condition.get("status") != "True":
            why = condition.get("message") or condition.get("reason") or "no condition yet"
            missing.append(f"{name} not ready ({why})")
            continue
        latest = [t for t in traffic(isvc, name) if t.get("latestRevision")]
        state = ((status.get("components") or {}).get(name) or {})
        if not latest or latest[0].get("percent") != want \
                or latest[0].get("revisionName") != state.get("latestCreatedRevision"):
            shown = ", ".join(f"{t.get('revisionName')} {t.get('percent')}%" for t in traffic(isvc, name)) or "none"
            missing.append(f"{name} traffic {shown}, waiting for {state.get('latestCreatedRevision')} {want}%")
    if not missing and not is_true(isvc, "Ready"):
        missing.append("Ready is not True")
    return not missing, "; ".join(missing)


def wait_until_rolled_out(read: Callable[[], dict], percent: int | None, progress: Callable[[str], None],
                          timeout_s: float, poll_s: float) -> dict:
    """Poll ``read`` until :func:`rollout_progress` is done; a progress line each time what is missing changes;
    ``TimeoutError(what is missing)`` at the deadline."""
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        current = read()
        done, missing = rollout_progress(current, percent)
        if done:
            return current
        if missing != last:
            progress(f"waiting: {missing}")
            last = missing
        if time.monotonic() >= deadline:
            raise TimeoutError(missing)
        time.sleep(min(poll_s, max(0.05, deadline - time.monotonic())))
