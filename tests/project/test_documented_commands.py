"""The README's and the docs' commands, run as written, as a new user runs them.

Every fenced ```bash block of README.md and docs/**/*.md is found (not lines of a known file: the docs move),
and each of its commands runs in a fresh folder with the defaults it shows: no PNEUMOSCOPE_HOME (the default
``.pneumoscope``), no MLFLOW_TRACKING_URI (the local SQLite store), the ports it names, ``pneumoscope`` on
the PATH. What a command needs from the world is there as a user has it: ``../shared/data/chest_xray_224``
is a small copy of the shared data (40 images per class, and the official val split), and ``chest.jpeg``,
``chest.png`` and ``chest.dcm`` are real X-rays. Training budgets are capped by documented environment
variables (PNEUMOSCOPE_MAX_EPOCHS, PNEUMOSCOPE_MAX_STEPS_PER_EPOCH); nothing else is changed.

A command that starts a server (``pneumoscope serve``, ``pneumoscope web``) runs in the background until it
is ready; the commands after it in its block talk to it; it is stopped (SIGTERM, and it must exit 0) before
the next server starts or when its block ends.

A command is NOT run only by one of these rules, and the test prints each one it applied:

- a cluster command: :data:`CLUSTER_ONLY` (kubectl, helm install, pipeline submit, pushes to a registry),
  and ``pneumoscope rollout`` without ``--local`` (the cluster's KServe);
- a synopsis, not a command: option brackets ``[--x]``, alternatives ``a|b``, ``<placeholders>`` or ``...``;
- a block preceded by ``<!-- not-run: REASON -->``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA, require_shared
from serving_fixtures import dicom_from_image, stop_server, wait_ready

pytestmark = pytest.mark.integration

#: command prefix -> what it needs that no test machine has
CLUSTER_ONLY = {
    "kubectl ": "a Kubernetes cluster",
    "helm install": "a Kubernetes cluster",
    "helm upgrade": "a Kubernetes cluster",
    "pneumoscope pipeline submit": "a Kubeflow Pipelines server",
    "docker push": "a container registry",
    "make images": "a container registry (it builds the images and pushes them)",
    "pneumoscope export-modelcar": "a container registry (it builds the modelcar image and pushes it)",
}
SYNOPSIS = re.compile(r"\[-|\|\s*[a-z]|[a-z]\|[a-z]|<[a-z][a-z ]*>|\.\.\.")
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
SERVERS = ("pneumoscope serve", "pneumoscope web")
CAPS = {"PNEUMOSCOPE_MAX_EPOCHS": "1", "PNEUMOSCOPE_MAX_STEPS_PER_EPOCH": "2"}
PORTS = (8000, 8080, 8081, 8082)  # the web app, the transformer (REST, gRPC), serve's web app (PORT + 2)


@dataclass
class Command:
    where: str  # FILE:LINE
    block: int
    text: str
    skipped: str | None = None  # the rule that keeps it from running


def documents() -> list[Path]:
    """The README, then the docs in the site's reading order (mkdocs.yml's nav: data before training before
    evaluation, as a user runs them), then any page the nav does not list."""
    import yaml

    def pages(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, dict):
            return [p for value in node.values() for p in pages(value)]
        return [p for item in node or [] for p in pages(item)]

    nav = pages(yaml.safe_load((REPO / "mkdocs.yml").read_text().split("\nnav:", 1)[1].join(["nav:", ""]))["nav"])
    ordered = [REPO / "docs" / page for page in nav if (REPO / "docs" / page).is_file()]
    rest = [p for p in sorted((REPO / "docs").rglob("*.md")) if p not in ordered]
    return [REPO / "README.md", *ordered, *rest]


def discover() -> list[Command]:
    commands = []
    for block_number, (path, match, text) in enumerate(
            (path, match, path.read_text()) for path in documents()
            for match in BLOCK.finditer(path.read_text())):
        before = text[:match.start()].rstrip().splitlines()[-1:] or [""]
        marker = NOT_RUN.search(before[0])
        first_line = text[:match.start()].count("\n") + 1
        lines = match.group(1).replace("\\\n", " ").splitlines()
        for offset, raw in enumerate(lines):
            command = re.sub(r"\s+#\s.*$", "", raw).strip()  # a trailing comment
            if not command or command.startswith("#"):
                continue
            where = f"{path.relative_to(REPO)}:{first_line + 1 + offset}"
            commands.append(Command(where, block_number, command, _rule(command, marker)))
    return commands


def _rule(command: str, marker) -> str | None:
    if marker:
        return f"<!-- not-run: {marker.group(1)} -->"
    for prefix, needs in CLUSTER_ONLY.items():
        if command.startswith(prefix):
            return f"cluster only ({prefix.strip()}): needs {needs}"
    if command.startswith("pneumoscope rollout") and "--local" not in command.split():
        return "cluster only (pneumoscope rollout without --local): needs the cluster's KServe"
    if SYNOPSIS.search(command):
        return "a synopsis with placeholders, not a command"
    return None


def test_every_documented_command_is_found_and_each_skip_names_its_rule(capsys):
    commands = discover()
    assert len({c.where.split(":")[0] for c in commands}) >= 1 and len(commands) >= 20
    run = [c for c in commands if not c.skipped]
    assert any(c.text.startswith("pneumoscope serve") and "--traffic-split" in c.text for c in run)
    assert any(c.text.startswith("pneumoscope train") for c in run)
    with capsys.disabled():
        print(f"\n{len(run)} documented commands run, {len(commands) - len(run)} not:")
        for c in commands:
            if c.skipped:
                print(f"  not run  {c.where:<22} {c.text[:70]:<70}  <- {c.skipped}")


# ---------------------------------------------------------------------------------------------------------

def _fresh_folder(root: Path) -> tuple[Path, dict]:
    """A working folder beside a small copy of the shared data, the inputs the commands name, and an
    environment with the documented defaults (and ``pneumoscope`` on the PATH)."""
    source = require_shared("chest_xray_224")
    data = root / "shared" / "data" / "chest_xray_224"
    for split, per_class in (("train", 40), ("val", None)):
        for cls in ("NORMAL", "PNEUMONIA"):
            (data / split / cls).mkdir(parents=True)
            for f in sorted((source / split / cls).iterdir())[:per_class]:
                shutil.copy(f, data / split / cls / f.name)
    work = root / "work"
    work.mkdir()
    from PIL import Image

    jpeg = sorted((SHARED_DATA / "chest_xray_224" / "train" / "PNEUMONIA").iterdir())[300].read_bytes()
    (work / "chest.jpeg").write_bytes(jpeg)
    Image.open(work / "chest.jpeg").convert("L").save(work / "chest.png")
    (work / "chest.dcm").write_bytes(dicom_from_image(jpeg))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "pneumoscope"  # the console script, run by this interpreter (and this checkout)
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m model.cli \"$@\"\n")
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PNEUMOSCOPE_") and k != "MLFLOW_TRACKING_URI"}
    env.update(CAPS, PATH=f"{bin_dir}:{env.get('PATH', '')}", NO_ALBUMENTATIONS_UPDATE="1", PYTHONUNBUFFERED="1")
    return work, env


class Runner:
    def __init__(self, cwd: Path, env: dict, log: Path):
        self.cwd, self.env, self.log = cwd, env, log
        self.server: subprocess.Popen | None = None
        self.server_command: Command | None = None
        self.timings: list[tuple[Command, float]] = []

    def run(self, command: Command) -> None:
        started = time.monotonic()
        if command.text.startswith(SERVERS):
            self.stop()
            self._start(command)
        else:
            with open(self.log, "a") as log:
                log.write(f"\n$ {command.text}   ({command.where})\n")
                log.flush()
                result = subprocess.run(["bash", "-c", command.text], cwd=self.cwd, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=900)
            assert result.returncode == 0, f"{command.where}: `{command.text}` exited {result.returncode}:\n" \
                                           f"{self._tail()}"
        self.timings.append((command, time.monotonic() - started))

    def _start(self, command: Command) -> None:
        log = open(self.log, "a")
        log.write(f"\n$ {command.text}   ({command.where}, in the background)\n")
        log.flush()
        # exec: the shell becomes the command, so SIGTERM reaches it (it drains and stops what it started)
        self.server = subprocess.Popen(["bash", "-c", f"exec {command.text}"], cwd=self.cwd, env=self.env,
                                       stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True)
        self.server_command = command
        if command.text.startswith("pneumoscope serve"):
            line = self.server.stdout.readline()  # READY {...} once everything answers, or EOF if it failed
            assert line.startswith("READY "), f"{command.where}: `{command.text}` did not become ready " \
                                              f"(exit {self.server.wait(60)}):\n{self._tail()}"
        else:  # the web app
            self.server.log = self.log
            port = int(re.search(r"--port\s+(\d+)", command.text)[1])
            wait_ready(self.server, f"http://127.0.0.1:{port}/readyz", timeout=120)

    def stop(self) -> None:
        if self.server is None:
            return
        server, command, self.server = self.server, self.server_command, None
        code = stop_server(server)  # SIGTERM: it drains and stops what it started
        # uvicorn (the web app) re-raises the signal once its graceful shutdown is done: that is a clean stop too
        clean = (0, -signal.SIGTERM) if command.text.startswith("pneumoscope web") else (0,)
        assert code in clean, f"{command.where}: `{command.text}` exited {code} on SIGTERM:\n{self._tail()}"

    def _tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])


@pytest.mark.timeout(1800)  # about 6 minutes on 2 idle cores: two pipeline runs, four servers
def test_the_documented_local_commands_run_as_written(tmp_path, capsys):
    from serving.stack import port_free

    busy = [p for p in PORTS if not port_free(p)]
    if busy:
        pytest.skip(f"the documented ports {busy} are in use on this machine; the commands name them as written")
    commands = discover()
    work, env = _fresh_folder(tmp_path)
    runner = Runner(work, env, tmp_path / "commands.log")
    block = None
    try:
        for command in commands:
            if command.block != block:
                runner.stop()  # a block's server serves that block's commands only
                block = command.block
            if not command.skipped:
                runner.run(command)
        runner.stop()
    finally:
        if runner.server is not None and runner.server.poll() is None:
            runner.server.kill()
            runner.server.wait()
    with capsys.disabled():
        total = sum(seconds for _, seconds in runner.timings)
        print(f"\n{len(runner.timings)} documented commands ran as written in {total:.0f} s:")
        for command, seconds in runner.timings:
            print(f"  {seconds:6.1f} s  {command.where:<22} {command.text[:90]}")
