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
        if not doc or owner(doc) is None:
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


def owner(doc: dict | None) -> int | None:
    """The pid of the live canary process that wrote this state document, or None.

    A document left behind by a canary that failed to start or was killed carries no pid, a pid of 0, or the
    pid of a process that is gone, or whose number was since reused by another process (told apart by its
    start time): none of those is a running canary."""
    status = (doc or {}).get("status") or {}
    pid, started = status.get("pid"), status.get("pid_started")
    if not _alive(pid):
        return None
    if started is not None and process_start_time(int(pid)) not in (None, started):
        return None
    return int(pid)


def _alive(pid) -> bool:
    """A live process with this id. Only a positive int is a process: ``os.kill(0, 0)`` signals the caller's own
    process group (and succeeds), a negative number another group."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and belongs to another user
        return True
    except OSError:
        return False
    return True


def process_start_time(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (``/proc/PID/stat`` field 22); None where unknown."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None