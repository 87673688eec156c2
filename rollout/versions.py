"""The MLflow side of a rollout: which versions may go out, the ``champion`` alias, history tags.

Refusals (one line each): a version that is not registered; one whose bundle does not verify against
the digest the registry recorded at registration (its ``bundle_sha256`` tag); one that failed its
evaluation gate (the ``evaluation_gate`` tag written at registration), unless forced.
"""

from __future__ import annotations

import json
import tempfile

from rollout.errors import RolloutError

CHAMPION = "champion"
GATE_TAG = "evaluation_gate"
HISTORY_TAG = "rollout_history"
REFERENCE_TAG = "reference_distribution"
TAG_LIMIT = 5000  # MLflow's longest tag value


class Registry:
    def __init__(self, model_name: str, tracking_uri: str | None = None):
        from model.registry import RegistryError, connect

        self.name = model_name
        self.tracking_uri = tracking_uri
        try:
            self.client = connect(tracking_uri)
        except RegistryError as exc:
            raise RolloutError(str(exc)) from None

    def version(self, version: str):
        try:
            return self.client.get_model_version(self.name, str(version))
        except Exception as exc:  # MlflowException RESOURCE_DOES_NOT_EXIST, or the server went away
            first = str(exc).splitlines()[0][:160]
            raise RolloutError(f"version {version} of model {self.name!r} is not registered in MLflow ({first})") \
                from None

    def check_servable(self, version: str, force: bool = False) -> dict:
        """Refuse a version that is not registered, does not verify, or failed its gate (unless ``force``).
        Returns its tags."""
        from model.bundle import BundleError
        from model.registry import RegistryError, fetch_model

        tags = dict(self.version(version).tags or {})
        expected = tags.get("bundle_sha256")
        if not expected:
            raise RolloutError(f"version {version} has no bundle_sha256 tag: its integrity cannot be checked; "
                               "refusing to roll it out")
        with tempfile.TemporaryDirectory(prefix="pneumoscope-verify-") as tmp:
            try:
                bundle, _ = fetch_model(f"models:/{self.name}/{version}", tmp, self.tracking_uri)
            except (BundleError, RegistryError, OSError) as exc:
                raise RolloutError(f"version {version} does not verify: {str(exc).splitlines()[0][:200]}") from None
            if bundle.sha256 != expected:
                raise RolloutError(f"version {version} does not verify: its bundle hashes to {bundle.sha256[:12]}... "
                                   f"but the registry recorded {expected[:12]}... at registration")
        gate = tags.get(GATE_TAG)
        if gate != "passed" and not force:
            why = f"its evaluation gate says {gate!r}" if gate else "it has no evaluation_gate tag (never evaluated)"
            raise RolloutError(f"version {version} did not pass evaluation: {why}; use --force to roll it out anyway")
        return tags

    def storage_uri(self, version: str) -> str:
        return self.client.get_model_version_download_uri(self.name, str(version))

    def champion(self) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.name, CHAMPION).version)
        except Exception:
            return None

    def move_champion(self, version: str) -> None:
        self.client.set_registered_model_alias(self.name, CHAMPION, str(version))

    def add_history(self, version: str, entry: dict) -> None:
        """Append ``entry`` to the version's rollout_history tag (idempotent: an equal entry is not repeated)."""
        tags = dict(self.version(version).tags or {})
        try:
            entries = json.loads(tags.get(HISTORY_TAG) or "[]")
        except json.JSONDecodeError:
            entries = []
        if entry in entries:
            return
        entries.append(entry)
        value = json.dumps(entries, separators=(",", ":"))
        while len(value) > TAG_LIMIT and len(entries) > 1:
            entries.pop(0)
            value = json.dumps(entries, separators=(",", ":"))
        self.client.set_model_version_tag(self.name, str(version), HISTORY_TAG, value)

    def reference(self, version: str) -> dict | None:
        """The prediction mix evaluation stored with the version (see model.evaluation.reference_distribution)."""
        raw = dict(self.version(version).tags or {}).get(REFERENCE_TAG)
        try:
            return json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return None
