"""The local canary's state, and the client side of ``pneumoscope rollout ... --local``.

The local canary (``rollout.local_canary``: nginx in front of one serving stack per model version) is
driven the way the cluster commands drive KServe: through a state document shaped like an
InferenceService (``$PNEUMOSCOPE_HOME/rollout/local.json``). A rollout command writes the spec (the pinned
version, ``canaryTrafficPercent``) and the annotations; the canary's controller reconciles and writes
``status`` with the same conditions and traffic entries KServe writes. So the rollout logic
(``rollout.controller``) is one and the same for a cluster and for one machine, and this module, all that
``rollout status/promote/... --local`` needs, imports nothing of serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from rollout import inferenceservice as isvc_
from rollout.errors import RolloutError
from rollout.settings import RolloutSettings


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch: dicts merge, None deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class StateFile:
    """The state document, read and written under an flock (the CLI and the controller share it)."""

    def __init__(self, home: Path):
        self.dir = Path(home) / "rollout"
        self.path = self.dir / "local.json"
        self.targets = self.dir / "targets.json"

    @contextlib.contextmanager
    def locked(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "local.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def write(self, doc: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(self.path)

    def update(self, fn: Callable[[dict], dict]) -> dict:
        with self.locked():
            doc = fn(self.read() or {})
            self.write(doc)
            return doc


class LocalBackend:
    """What ``rollout ... --local`` drives: the state document of a running ``rollout.local_canary.LocalCanary``."""

    where = "local canary"

    def __init__(self, settings: RolloutSettings):
        self.settings = settings
        self.state = StateFile(settings.home)
        self.identity = f"{getpass.getuser()}@{socket.gethostname()}"

    def describe(self) -> str:
        return f"the local canary ({self.state.path})"

    def read(self) -> dict:
        doc = self.state.read()
        pid = ((doc or {}).get("status") or {}).get("pid")
        if not doc or not pid or not _alive(pid):
            raise RolloutError(f"no local canary is running (no live server behind {self.state.path}): start one "
                               "with `pneumoscope serve --model models:/pneumonia@champion --traffic-split`")
        return doc

    def apply(self, spec: dict | None = None, annotations: dict | None = None) -> dict:
        self.read()

        def change(doc):
            before = doc.get("spec")
            doc = merge_patch(doc, {"spec": spec or {}, "metadata": {"annotations": annotations or {}}})
            if doc.get("spec") != before:
                doc["metadata"]["generation"] = doc["metadata"].get("generation", 0) + 1
            return doc

        return self.state.update(change)

    def wait(self, percent, progress, timeout_s: float | None = None) -> dict:
        timeout_s = self.settings.timeout_s if timeout_s is None else timeout_s
        # the local controller reconciles in-process: poll faster than a cluster's
        return isvc_.wait_until_rolled_out(self.read, percent, progress, timeout_s, min(self.settings.poll_s, 0.25))

    def needs_storage_uri(self, current: dict) -> bool:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError):
        return False
