"""``make demo``: install, train on kfp.local, register, add a login and serve, one progress line per phase.

The Makefile runs this with the system Python, before ``.venv`` may exist: standard library only, nothing from
the project. Each phase's whole output goes to a log file under ``$PNEUMOSCOPE_HOME/demo-logs/``; the terminal
gets one line per phase (and per pipeline step) with its time. A failing phase ends the demo with the tail of
its log and the log's path. Once the stack answers, the login and the URLs come last, in a box.

    python3 -m pipelines.demo [--venv .venv] [--port 8480] [--web-port 8482] [--gateway-port 8484] [--user demo]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

#: From the start to READY, the first install excluded: 2 min 31 s on 2 idle cores of an AMD EPYC Zen 5 (native
#: bf16; load average 0.2), 3 min 55 s shared with other work (load 2.7). A CPU without native bf16 trains in fp32,
#: about 2.5x slower.
EXPECTED_MINUTES = 3
TAIL_LINES = 25
NAME_WIDTH, WHAT_WIDTH = 15, 56  # with the time: 78 columns
BOX_WIDTH, LABEL_WIDTH = 76, 15  # inside the borders; the label column fits "DICOM gateway"
#: kfp.local's own lines around each step (colour codes stripped first).
STEP_STARTED = re.compile(r"Executing task '([\w-]+)'")
STEP_FINISHED = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: ``pneumoscope serve`` prints one line ``READY {json}`` when everything answers.
READY = "READY "
#: ``users add --generate-password`` prints the password once: for the terminal, never for the log file.
PASSWORD = re.compile(r"(with password: )(\S+)")
PIPELINE_STEPS = {
    "preprocess": "decode, quality-gate, deduplicate, split by patient",
    "train": "ResNet-50, random init, 96 px, 2 epochs (profile demo)",
    "evaluate": "ONNX export, calibration, threshold, int8 export gate",
    "register": "MLflow run, model version, champion alias",
}


class PhaseFailed(Exception):
    def __init__(self, phase: Phase, returncode: int):
        super().__init__(f"{phase.name} failed with exit status {returncode}")
        self.phase, self.returncode = phase, returncode


@dataclass
class Phase:
    name: str
    what: str
    argv: list[str]
    log: Path
    steps: dict[str, str] = field(default_factory=dict)  # kfp step -> what it does: a line of its own each


def elapsed(seconds: float) -> str:
    return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"


class Progress:
    """One line per phase: its name and what it does, then, when it ends, how long it took. On a terminal the
    time counts up while the phase runs (a first install is silent for minutes otherwise)."""

    def __init__(self, out: TextIO):
        self.out = out
        self.live = out.isatty()
        self.label = ""
        self.started = 0.0  # 0: no line open
        self.lock = threading.Lock()

    @property
    def open(self) -> bool:
        return self.started != 0.0

    def begin(self, name: str, what: str, indent: int = 2) -> None:
        with self.lock:
            self.label = f"{' ' * indent}{name:<{NAME_WIDTH - indent}}{what:<{WHAT_WIDTH - 1}} "
            self.started = started = time.monotonic()
            self.out.write(self.label)
            self.out.flush()
        if self.live:
            threading.Thread(target=self._tick, args=(started,), daemon=True).start()

    def _tick(self, started: float) -> None:
        while True:
            time.sleep(1.0)
            with self.lock:
                if self.started != started:
                    return
                self.out.write(f"\r{self.label}{elapsed(time.monotonic() - started)}")
                self.out.flush()

    def end(self, note: str = "", timed: bool = True) -> None:
        with self.lock:
            spent = elapsed(time.monotonic() - self.started) if timed else ""
            line = f"{self.label}{spent}{note}".rstrip()
            self.out.write(f"\r{line}\n" if self.live else f"{line[len(self.label):]}\n")
            self.out.flush()
            self.started = 0.0

    def say(self, text: str = "") -> None:
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()


_terminated = False


def _stop_on_sigterm(signum, frame) -> None:
    """SIGTERM stops the demo as Ctrl-C does, the running phase's command included."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def run_phase(phase: Phase, progress: Progress, on_ready: Callable[[str], None] | None = None) -> list[str]:
    """Run ``phase.argv`` with its output in ``phase.log``; returns the output's lines. Raises PhaseFailed for a
    non-zero exit status.

    ``on_ready``: the command is a server; its ``READY {json}`` line ends the phase's progress line and is passed
    to ``on_ready``, and the phase lasts until the server stops (Ctrl-C)."""
    lines: list[str] = []
    progress.begin(phase.name, phase.what)
    step = None
    with open(phase.log, "a", encoding="utf-8") as log:
        process = subprocess.Popen(phase.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", bufsize=1)
        try:
            for line in process.stdout:
                lines.append(line)
                log.write(PASSWORD.sub(r"\1(shown on the terminal only)", line))
                log.flush()
                if phase.steps:
                    step = _step_progress(ANSI.sub("", line), phase, progress, step)
                if on_ready is not None and line.startswith(READY) and progress.open:
                    progress.end()
                    on_ready(line[len(READY):])
        except KeyboardInterrupt:
            # Ctrl-C reached the whole process group: the command stops itself. A SIGTERM reached this process only
            # (a closed session, a supervisor): pass it on, or the servers would outlive the demo.
            if _terminated:
                process.terminate()
            process.wait()
            raise
        returncode = process.wait()
    if returncode != 0:
        if progress.open:
            progress.end("  FAILED")
        raise PhaseFailed(phase, returncode)
    if progress.open:
        progress.end()
    return lines


def _step_progress(line: str, phase: Phase, progress: Progress, step: str | None) -> str | None:
    """A line of its own for each pipeline step, from kfp.local's "Executing task" and "finished" lines."""
    started = STEP_STARTED.search(line)
    if started and started.group(1) in phase.steps:
        if progress.open:  # the phase's own line (or a step that never said it finished) ends here
            progress.end(timed=step is not None)
        progress.begin(started.group(1), phase.steps[started.group(1)], indent=4)
        return started.group(1)
    finished = STEP_FINISHED.search(line)
    if finished and finished.group(1) == step and progress.open:
        progress.end("" if finished.group(2) == "SUCCESS" else f"  {finished.group(2)}")
        return None
    return step


def tail(path: Path, count: int = TAIL_LINES) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [ANSI.sub("", line) for line in lines[-count:]]


def box(rows: list[tuple[str, str]], title: str) -> str:
    """The closing box: ``rows`` of (label, value), values wrapped at spaces to fit 80 columns (a long path
    widens the box rather than break)."""
    lines = [title, ""]
    for label, value in rows:
        wrapped = textwrap.wrap(value, BOX_WIDTH - LABEL_WIDTH, break_long_words=False, break_on_hyphens=False)
        lines += [f"{label if i == 0 else '':<{LABEL_WIDTH}}{part}" for i, part in enumerate(wrapped or [""])]
    width = max(BOX_WIDTH, *map(len, lines))
    return "\n".join([f"┌{'─' * (width + 2)}┐", *(f"│ {line:<{width}} │" for line in lines),
                      f"└{'─' * (width + 2)}┘"])


def predictor_platform(info: dict) -> str | None:
    """The engine and precision the predictor chose at load (its v2 model metadata), or None."""
    try:
        url = f"{info['predictor_rest']}/v2/models/{info['model_name']}"
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read()).get("platform")
    except (OSError, ValueError, KeyError):
        return None


def gate_refusals(serve_log: Path) -> list[str]:
    """Why an engine x precision did not serve: the engine parity gate's verdicts in the servers' log."""
    found = re.findall(r"engine (\S+) failed the engine parity gate \([^)]*\): (.*)",
                       serve_log.read_text(encoding="utf-8", errors="replace") if serve_log.exists() else "")
    return [f"{key}: {reason}" for key, reason in found]


def closing_rows(info: dict, login: list[str], model: dict, platform: str | None, refusals: list[str],
                 args, logs: Path) -> list[tuple[str, str]]:
    rows = [("web app", info.get("web", f"http://127.0.0.1:{args.web_port}"))]
    password = next((m.group(2) for line in login if (m := PASSWORD.search(line))), None)
    if password:
        rows += [("  sign in", args.user), ("  password", f"{password}  (shown only this once)")]
    else:
        rows += [("  sign in", f"{args.user}, made by an earlier demo; a new password: {args.bin}/pneumoscope "
                               f"users set-password {args.user} --generate-password")]
    rows += [("REST v1/v2", info["rest"]), ("gRPC v2", info["grpc"])]
    version = f"{info.get('model_name', 'pneumonia')} version {info.get('model_version', '?')}"
    if model.get("aliases"):
        version += f" ({', '.join(model['aliases'])})"
    rows.append(("model", version))
    if platform:
        rows.append(("engine", f"{platform} (engine parity gate, then speed)"))
    rows += [("", f"not served: {refusal}") for refusal in refusals]
    rows.append(("try", f"{args.bin}/pneumoscope predict IMAGE --url {info['rest']}"))
    gateway = info.get("gateway")
    if gateway:
        host, _, port = gateway["dicom"].rpartition(":")
        rows += [("DICOM gateway", f"{gateway['ae_title']} at {gateway['dicom']} (films show in the web app)"),
                 ("  send a film", f"storescu -aec {gateway['ae_title']} {host} {port} FILM.dcm  (dcmtk)")]
    rows.append(("logs", f"{logs}/"))
    return rows


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=".venv", help="the project's virtual environment (default .venv)")
    parser.add_argument("--make", default=os.environ.get("MAKE", "make"), help="make, to install the venv")
    parser.add_argument("--pneumoscope", help="the pneumoscope command (default VENV/bin/pneumoscope)")
    parser.add_argument("--port", type=int, default=8480, help="transformer REST port; gRPC is PORT+1")
    parser.add_argument("--web-port", type=int, default=8482, help="the web app's port")
    parser.add_argument("--gateway-port", type=int, default=8484, help="the DICOM gateway's port (0: no gateway)")
    parser.add_argument("--user", default="demo", help="the web app login to create")
    args = parser.parse_args(argv)
    args.bin = f"{args.venv}/bin"
    command = args.pneumoscope or f"{args.bin}/pneumoscope"
    logs = (Path(os.environ.get("PNEUMOSCOPE_HOME") or ".pneumoscope") / "demo-logs").resolve()
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    progress = Progress(out)
    progress.say("pneumoscope demo: train, register and serve a small model on this machine")
    progress.say(f"(about {EXPECTED_MINUTES} minutes on 2 idle cores with native bf16, longer without, plus the")
    progress.say("first install; a demonstration of the machinery, not a clinical model)")
    progress.say(f"logs: {logs}/PHASE.log\n")
    phases = [
        Phase("install", f"Python packages into {args.venv}/ (first time: minutes)",
              [args.make, "--no-print-directory", "-s", f"{args.venv}/.installed"], logs / "install.log"),
        Phase("pipeline", "the training pipeline on kfp.local",
              [command, "pipeline", "run", "--local", "--profile", "demo"], logs / "pipeline.log", PIPELINE_STEPS),
        Phase("user", f"a web app login '{args.user}', if there is none",
              [command, "users", "add", args.user, "--generate-password", "--if-missing"], logs / "user.log"),
    ]
    serve_log = logs / "serve.log"
    serve = Phase("serve", "predictor, transformer, web app and DICOM gateway; engine parity gate",
                  [command, "serve", "--model", "models:/pneumonia@champion", "--port", str(args.port),
                   "--web-port", str(args.web_port), "--log-file", str(serve_log),
                   *(["--gateway-port", str(args.gateway_port)] if args.gateway_port else [])], serve_log)
    started = time.monotonic()
    try:
        run_phase(phases[0], progress)
        model = _last_json(run_phase(phases[1], progress))
        login = run_phase(phases[2], progress)

        def show_box(ready_json: str) -> None:
            info = json.loads(ready_json)
            rows = closing_rows(info, login, model, predictor_platform(info), gate_refusals(serve_log), args, logs)
            progress.say(f"\nready after {elapsed(time.monotonic() - started)}\n")
            progress.say(box(rows, "pneumoscope is running; Ctrl-C stops everything"))

        run_phase(serve, progress, on_ready=show_box)
    except PhaseFailed as failed:
        progress.say(f"\n{failed.phase.name} failed (exit status {failed.returncode}). The end of its log:\n")
        for line in tail(failed.phase.log):
            progress.say(f"  | {line}")
        progress.say(f"\nfull log: {failed.phase.log}")
        return failed.returncode or 1
    except KeyboardInterrupt:
        progress.say("\nstopped")
        return 130
    progress.say("stopped")
    return 0


def _last_json(lines: list[str]) -> dict:
    """The pipeline's result: the one JSON object it prints on stdout."""
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    return {}


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    sys.exit(main())
