"""Rollout transitions over a backend (the cluster's InferenceService, or the local nginx canary).

Order of every change: checks first (nothing written), then ONE patch of the backend that carries the
spec change, its history entry and a ``pending`` record of what is left to do in MLflow; then the wait
for the new traffic split; then MLflow (alias, tags); then the pending record is cleared. So:

- a refused check or a failed patch changes nothing anywhere (no alias moves);
- a failure after the patch leaves the pending record, and the message says what state things are in;
  the next rollout command finds the record and finishes that step first (every step is idempotent).

``champion`` stays on the stable version during a canary, moves on promote, never on rollback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone

from rollout import inferenceservice as isvc_
from rollout.errors import RolloutError
from rollout.versions import Registry


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_percent(percent: int) -> None:
    if not 1 <= percent <= 99:
        raise RolloutError(f"--percent must be between 1 and 99, not {percent} (100 is `rollout promote`, "
                           "0 is `rollout rollback`)")


class Rollout:
    def __init__(self, backend, registry: Registry, model_name: str,
                 progress: Callable[[str], None] | None = None):
        self.backend, self.registry, self.model_name = backend, registry, model_name
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))

    # -- the unfinished MLflow half of an earlier step ---------------------------------------------------
    def finish_pending(self, current: dict) -> tuple[dict, str | None]:
        record = isvc_.pending(current)
        if not record:
            return current, None
        action, version, entry = record["action"], record["version"], record["entry"]
        self.progress(f"finishing the {action} of version {version} begun at {entry['time']} by {entry['user']}")
        self._wait(None if action != "canary" else record.get("percent"), action, version)
        outcome = {"canary": "serving", "promote": "promoted", "rollback": "rolled back"}[action]
        done = dict(entry, outcome=outcome)
        try:
            if action == "promote":
                self.registry.move_champion(version)
            self.registry.add_history(version, done)
        except RolloutError:
            raise
        except Exception as exc:  # MLflow unreachable or refusing
            state = {"canary": f"version {version} serves {record.get('percent')} % as a canary",
                     "promote": f"version {version} serves 100 %",
                     "rollback": f"version {record.get('from')} serves 100 % again"}[action]
            alias = (f"; the MLflow alias champion was NOT moved to {version} (still "
                     f"{self.registry.champion()})") if action == "promote" else ""
            raise RolloutError(f"{state} in the {self.backend.where}, but updating MLflow failed: "
                               f"{str(exc).splitlines()[0][:200]}{alias}; run `pneumoscope rollout {action}` "
                               "again to finish") from None
        history = [dict(e, outcome=outcome) if e == entry else e for e in isvc_.history(current)]
        current = self.backend.apply(annotations={isvc_.PENDING: None, isvc_.HISTORY: json.dumps(
            history[-isvc_.HISTORY_KEEP:], separators=(",", ":"))})
        return current, f"{action} of version {version}: {outcome}"

    def _wait(self, percent: int | None, action: str, version: str) -> dict:
        try:
            return self.backend.wait(percent, self.progress)
        except TimeoutError as exc:
            share = f"{percent} %" if percent else "100 %"
            raise RolloutError(f"the {action} of version {version} ({share}) is applied in the {self.backend.where} "
                               f"but not ready within the timeout: {exc}; run the command again to keep waiting "
                               "(and finish), `pneumoscope rollout status` to look, or `rollout rollback`") from None

    def _start(self) -> tuple[dict, str | None, str | None]:
        """The backend's state after finishing an earlier step; (state, its action, what was finished)."""
        current = self.backend.read()
        record = isvc_.pending(current)
        current, finished = self.finish_pending(current)
        if finished:
            self.progress(f"finished earlier step: {finished}")
        return current, record["action"] if record else None, finished

    def _record(self, current: dict, action: str, frm: str | None, to: str, **extra) -> tuple[dict, dict]:
        entry = {"time": _now(), "user": self.backend.identity, "action": action, "from": frm, "to": to,
                 **extra, "outcome": "started"}
        pending = {"action": action, "version": to, "from": frm, "entry": entry, **extra}
        return entry, {isvc_.HISTORY: isvc_.with_history(current, entry),
                       isvc_.PENDING: json.dumps(pending, separators=(",", ":"))}

    # -- commands -----------------------------------------------------------------------------------------
    def canary(self, version: str, percent: int, force: bool = False) -> str:
        check_percent(percent)
        version = str(version)
        current, _, _ = self._start()
        running, running_percent = isvc_.canary(current)
        stable = isvc_.stable_version(current, self.model_name)
        if running is not None:
            if running == version and running_percent == percent:
                return f"canary of version {version} at {percent} % is running (stable: version {stable})"
            raise RolloutError(f"a canary of version {running} is already running at {running_percent} %; "
                               "promote or roll it back first")
        if stable is None:
            raise RolloutError(f"cannot tell which model version {self.backend.describe()} serves (no "
                               f"{isvc_.VERSION_LABEL} label and no models:/{self.model_name}/N argument)")
        if version == stable:
            raise RolloutError(f"version {version} is already the stable version")
        tags = self.registry.check_servable(version, force)
        storage = self.registry.storage_uri(version) if self.backend.needs_storage_uri(current) else None
        spec = isvc_.spec_patch(current, self.model_name, version, percent, storage, tags.get("bundle_sha256"))
        entry, annotations = self._record(current, "canary", stable, version, percent=percent)
        annotations.update({isvc_.STABLE: stable, isvc_.CANARY: version})
        current = self.backend.apply(spec, annotations)
        self.progress(f"applied: version {version} takes {percent} %, version {stable} the rest; waiting for "
                      f"the {self.backend.where}")
        self.finish_pending(current)
        return f"canary of version {version} at {percent} % is serving (stable: version {stable})"

    def promote(self, analyze: Callable[[], object] | None = None) -> str:
        current, action, finished = self._start()
        running, percent = isvc_.canary(current)
        if running is None and action == "promote":
            return finished  # re-run after a failure: the earlier promote is now complete
        if running is None:
            raise RolloutError("no canary is running: nothing to promote (start one with `rollout canary`)")
        stable = isvc_.stable_version(current, self.model_name)
        if analyze is not None:
            verdict = analyze()
            for line in verdict.lines():
                self.progress(line)
            if not verdict.healthy:
                raise RolloutError(f"not promoting version {running}: the canary is {verdict.status} "
                                   f"({verdict.summary()})")
        entry, annotations = self._record(current, "promote", stable, running, percent=percent)
        annotations.update({isvc_.STABLE: running, isvc_.CANARY: None})
        current = self.backend.apply(isvc_.end_canary_patch(current), annotations)
        self.progress(f"applied: version {running} takes 100 %; waiting for the {self.backend.where}")
        self.finish_pending(current)
        return f"version {running} is promoted: 100 % of the traffic, MLflow alias champion -> {running}"

    def rollback(self) -> str:
        current, action, finished = self._start()
        running, percent = isvc_.canary(current)
        if running is None and action == "rollback":
            return finished
        if running is None:
            raise RolloutError("no canary is running: nothing to roll back")
        stable = isvc_.stable_version(current, self.model_name)
        tags = dict(self.registry.version(stable).tags or {})
        storage = self.registry.storage_uri(stable) if self.backend.needs_storage_uri(current) else None
        spec = isvc_.spec_patch(current, self.model_name, stable, None, storage, tags.get("bundle_sha256"))
        entry, annotations = self._record(current, "rollback", stable, running, percent=percent)
        annotations[isvc_.CANARY] = None
        # The pending record names the canary version (its history tag); the traffic goes back to `stable`.
        current = self.backend.apply(spec, annotations)
        self.progress(f"applied: version {stable} takes 100 % again; waiting for the {self.backend.where}")
        self.finish_pending(current)
        return f"rolled back: version {stable} serves 100 %, the canary of version {running} is removed " \
               f"(champion unchanged: {self.registry.champion()})"

    def status(self) -> dict:
        current = self.backend.read()
        running, percent = isvc_.canary(current)
        out = {"where": self.backend.describe(), "stable_version": isvc_.stable_version(current, self.model_name),
               "canary_version": running, "canary_percent": percent, "champion": self.registry.champion(),
               "ready": isvc_.is_true(current, "Ready"),
               "conditions": {k: v.get("status") for k, v in isvc_.conditions(current).items()},
               "traffic": {c: [{"revision": t.get("revisionName"), "percent": t.get("percent"),
                                "latest": bool(t.get("latestRevision"))} for t in isvc_.traffic(current, c)]
                           for c in isvc_.components(current)},
               "pending": isvc_.pending(current)}
        return out

    def history(self) -> list[dict]:
        return isvc_.history(self.backend.read())
