"""A real MLflow tracking server for tests (a fixture module; holds no tests).

``mlflow server`` leaves its workers behind when only its own PID is signalled: it is started with setsid,
in a session (and process group) of its own, and stopped or killed by that process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from serving.stack import free_port
from webapp_fixtures import wait_http


@dataclass
class MlflowServer:
    backend_uri: str
    artifacts: str  # --artifacts-destination: a folder or s3://bucket/prefix (served through the server)
    log: Path
    env: dict = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        self.port = self.port or free_port()
        return [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                str(self.port), "--backend-store-uri", self.backend_uri, "--artifacts-destination", self.artifacts,
                "--workers", "1"]

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.argv(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, **self.env})
        try:
            wait_http(f"{self.url}/health", self.process, timeout, self.log)
        except BaseException:
            self.kill()
            raise
        return self

    def _signal_group(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)  # setsid: its process group is its PID
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL the server and its workers at once (a crashed pod)."""
        self._signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)

    def stop(self) -> None:
        self._signal_group(signal.SIGTERM)
        if self.process is not None:
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
