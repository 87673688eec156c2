"""The engine choice, made once per kind of machine and reused by every later replica on that kind.

Timing every engine x precision at load costs seconds per candidate (:mod:`serving.engine_selection`), and
every new replica of an autoscaled predictor would pay it again while a burst waits for it. But the
answer depends only on what the timing measured: the bundle, the CPU and the engine builds. So the first
replica to time a bundle on a kind of machine records its choice under a key made of exactly those, and a
replica that finds a record for its own key builds only the recorded candidate and runs the engine parity
gate on it (accuracy is never taken on trust: the gate runs on every replica).

The key (:func:`choice_key`): the bundle's digest, the CPU model name, a digest of its flags, the CPUs this
process may use, the versions of the installed engines, and the settings that change what is timed
(engine, precision, threads, streams, batch size). Anything else changes the key, and so times again.

Where the record is kept (:func:`choice_store`), the model volume being read-only:

- the registry: a tag ``engine_choice.<key id>`` on the served model version (``models:/NAME/N``), or on
  ``engine_choice_model`` when the bundle comes from a folder (KServe's storageUri, a modelcar);
- otherwise a JSON file in ``engine_choice_dir`` (a writable folder, e.g. a volume the replicas share);
- otherwise nowhere: every start times, as before.

``engine_choice``: ``reuse`` (default: read, and record after timing), ``refresh`` (time, and overwrite the
record), ``off`` (time, read and record nothing). Replicas that start together on an empty store all time
and all write; the last write wins, and each serves its own measured choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Protocol

from serving.engine import ENGINES, cpu_flags

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
TAG_PREFIX = "engine_choice."


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return ""


def engine_versions() -> dict[str, str | None]:
    """The installed engines' versions (None: not installed), from package metadata: no engine is imported."""
    versions = {}
    for engine in ENGINES:
        try:
            versions[engine] = metadata.version(engine)
        except metadata.PackageNotFoundError:
            versions[engine] = None
    return versions


def choice_key(bundle_sha256: str, settings) -> dict:
    """What the timing's result depends on; two replicas with equal keys would measure the same ranking."""
    from model.settings import available_cpus

    flags = sorted(cpu_flags())
    return {"bundle_sha256": bundle_sha256, "cpu_model": cpu_model(),
            "cpu_flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
            "cpus": available_cpus(), "engines": engine_versions(), "engine": settings.engine,
            "precision": settings.precision, "threads": settings.engine_threads(), "streams": settings.streams(),
            "max_batch_size": settings.max_batch_size}


def key_id(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def make_record(key: dict, engine: str, precision: str, table: list[dict], seconds: float) -> dict:
    """What a replica records after timing: the choice, the table that made it, and where and when."""
    return {"format": RECORD_FORMAT, "key": key, "engine": engine, "precision": precision, "table": table,
            "selection_seconds": round(seconds, 2), "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "recorded_by": socket.gethostname()}


def usable(record, key: dict) -> bool:
    """A record made for exactly this key (a hash collision or a hand-edited record is not trusted)."""
    return (isinstance(record, dict) and record.get("format") == RECORD_FORMAT and record.get("key") == key
            and record.get("engine") in ENGINES and isinstance(record.get("precision"), str))


class ChoiceStore(Protocol):
    where: str

    def read(self, key_id: str) -> dict | None:
        """The record kept under ``key_id``, or None (nothing kept, or unreadable: logged)."""

    def write(self, key_id: str, record: dict) -> None:
        """Keep ``record`` under ``key_id``; a failure is logged, never raised (serving goes on)."""


class RegistryStore:
    """Model-version tags of one registry version: ``engine_choice.<key id>`` = the record as JSON."""

    def __init__(self, model_uri: str, tracking_uri: str | None, bundle_sha256: str):
        self.model_uri, self.tracking_uri, self.bundle_sha256 = model_uri, tracking_uri, bundle_sha256
        self.where = f"registry tag on {model_uri}"
        self._client = self._name = self._version = None

    def _connect(self):
        if self._client is None:
            from model.registry import connect, resolve_model_uri

            client = connect(self.tracking_uri)
            self._name, self._version, _ = resolve_model_uri(self.model_uri, client)
            tagged = client.get_model_version(self._name, self._version).tags.get("bundle_sha256")
            if tagged != self.bundle_sha256:  # engine_choice_model names another version than the one served
                raise ValueError(f"models:/{self._name}/{self._version} holds another bundle than the one served "
                                 f"({str(tagged)[:12]}... vs {self.bundle_sha256[:12]}...)")
            self._client = client
        return self._client

    def read(self, key_id: str) -> dict | None:
        try:
            client = self._connect()
            value = client.get_model_version(self._name, self._version).tags.get(TAG_PREFIX + key_id)
            return None if value is None else json.loads(value)
        except Exception as exc:  # the registry is a cache here: without it the replica times, as before
            log.warning("engine choice: cannot read the %s: %s", self.where, str(exc).splitlines()[0][:200])
            return None

    def write(self, key_id: str, record: dict) -> None:
        try:
            self._connect().set_model_version_tag(self._name, self._version, TAG_PREFIX + key_id,
                                                  json.dumps(record, separators=(",", ":")))
        except Exception as exc:
            log.warning("engine choice: cannot write the %s: %s", self.where, str(exc).splitlines()[0][:200])


class FileStore:
    """``engine-choice-<key id>.json`` files in a writable folder (written whole, then renamed into place)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.where = f"file in {self.directory}"

    def path(self, key_id: str) -> Path:
        return self.directory / f"engine-choice-{key_id}.json"

    def read(self, key_id: str) -> dict | None:
        path = self.path(key_id)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("engine choice: cannot read %s: %s", path, exc)
            return None

    def write(self, key_id: str, record: dict) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.directory, prefix=".engine-choice-", suffix=".tmp",
                                             delete=False) as fh:
                json.dump(record, fh, indent=1)
            os.replace(fh.name, self.path(key_id))
        except OSError as exc:
            log.warning("engine choice: cannot write in %s: %s", self.directory, exc)


@dataclass
class Choice:
    """The store and key a selection reads from and records to."""

    store: ChoiceStore
    key: dict
    mode: str  # reuse | refresh

    @property
    def id(self) -> str:
        return key_id(self.key)

    def recorded(self) -> dict | None:
        if self.mode != "reuse":
            return None
        record = self.store.read(self.id)
        if record is not None and not usable(record, self.key):
            log.warning("engine choice: the record in the %s does not match this machine and bundle; timing again",
                        self.store.where)
            return None
        return record

    def record(self, engine: str, precision: str, table: list[dict], seconds: float) -> None:
        self.store.write(self.id, make_record(self.key, engine, precision, table, seconds))
        log.info("engine choice recorded (%s, key %s): %s %s", self.store.where, self.id, engine, precision)


def choice_store(settings, model_uri: str, bundle_sha256: str) -> ChoiceStore | None:
    """Where this predictor keeps its engine choice (see the module docstring), or None."""
    if settings.engine_choice == "off":
        return None
    registry_uri = model_uri if model_uri.startswith("models:/") else settings.engine_choice_model
    if registry_uri:
        return RegistryStore(registry_uri, settings.mlflow_tracking_uri, bundle_sha256)
    if settings.engine_choice_dir:
        return FileStore(settings.engine_choice_dir)
    return None


def for_bundle(settings, model_uri: str, bundle_sha256: str) -> Choice | None:
    """The choice record of this bundle on this machine, or None where nothing is kept."""
    store = choice_store(settings, model_uri, bundle_sha256)
    return None if store is None else Choice(store, choice_key(bundle_sha256, settings), settings.engine_choice)
