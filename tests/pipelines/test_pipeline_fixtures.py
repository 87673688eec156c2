"""Helpers for the pipeline tests (kept out of the shared conftest.py). Holds no tests itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import SHARED_DATA, require_shared

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[2]
CHEST_XRAY_224 = SHARED_DATA / "chest_xray_224"
VENV_BIN = Path(sys.executable).parent


def shared_xrays() -> Path:
    """The real 224 px chest X-rays in ../shared/data, or skip saying where they were looked for."""
    return require_shared("chest_xray_224")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on (the kernel picks it from the ephemeral range, far from 5000/8080/9000)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with {process.returncode} before listening on {port}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def pneumoscope(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed console script for real (a fresh process, as a user would)."""
    return subprocess.run([str(VENV_BIN / "pneumoscope"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})})


def one_error_line(stderr: str) -> str:
    """The single line a failing command prints; fails the test if there is more than one."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("pneumoscope: error: "), lines[0]
    return lines[0]
