"""``make demo``'s script (pipelines/demo.py) on stand-in commands: a fake ``pneumoscope`` and ``make`` that print
what the real ones print (kfp.local's step lines, the one-time password, ``READY {json}``), so the phases, the
log files, the failure path and the closing box are checked in seconds, without training anything.

And the filter that keeps kfp.local's ``Got executor_input:`` JSON out of the pipeline's log."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import demo
from pipelines.cli import WithoutExecutorInput

FAKE_PNEUMOSCOPE = textwrap.dedent('''\
    import json, os, sys, time
    command = sys.argv[1]
    if command == os.environ.get("FAKE_FAIL"):
        print("lots of output", *(f"line {i}" for i in range(40)), sep="\\n")
        print("pneumoscope: error: the train step failed (the step's log is above)", file=sys.stderr)
        sys.exit(2)
    if command == "pipeline":
        print("2026/01/01 INFO mlflow.store.db.utils: Creating initial MLflow database tables...")
        for step in ("preprocess", "train", "evaluate", "register"):
            print(f"12:00:00.000 - INFO - Executing task \\x1b[96m'{step}'\\x1b[0m")
            print(f"    [KFP Executor INFO]: {step} working")
            print(f"12:00:01.000 - INFO - Task \\x1b[96m'{step}'\\x1b[0m finished with status \\x1b[92mSUCCESS\\x1b[0m")
        print(json.dumps({"model_uri": "models:/pneumonia/1", "version": "1", "aliases": ["challenger", "champion"]}))
    elif command == "users":
        print("created user demo with password: s3cret-Pa55")
        print("(shown only this once; it is stored hashed)")
    elif command == "serve":
        log = sys.argv[sys.argv.index("--log-file") + 1]
        with open(log, "a") as f:
            f.write("WARNING serving.engine_selection: engine onnxruntime/int8 failed the engine parity gate (outputs "
                    "vs the fp32 reference on the bundle's 64 stored val images): max |logit diff| 0.459 > 0.268\\n")
        print("predictor starting", file=sys.stderr)
        info = {"rest": "http://127.0.0.1:8480", "grpc": "127.0.0.1:8481", "web": "http://127.0.0.1:8482",
                "model_name": "pneumonia", "model_version": "1", "predictor_rest": "http://127.0.0.1:9"}
        if "--gateway-port" in sys.argv:
            port = sys.argv[sys.argv.index("--gateway-port") + 1]
            info["gateway"] = {"dicom": "127.0.0.1:" + port, "ae_title": "PNEUMOSCOPE"}
        print("READY " + json.dumps(info), flush=True)
        time.sleep(0.5)
        print("stopping", file=sys.stderr)
    ''')


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """A fake pneumoscope and make as executables, PNEUMOSCOPE_HOME in tmp_path; returns the demo's argv."""
    pneumoscope = tmp_path / "pneumoscope"
    pneumoscope.write_text(f"#!{sys.executable}\n{FAKE_PNEUMOSCOPE}")
    make = tmp_path / "make"
    make.write_text(f"#!{sys.executable}\nimport sys\nprint('pip install ...', sys.argv[1:])\n")
    for path in (pneumoscope, make):
        path.chmod(0o755)
    monkeypatch.setenv("PNEUMOSCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    return ["--pneumoscope", str(pneumoscope), "--make", str(make), "--venv", str(tmp_path / "venv")]


def run_demo(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = demo.main(argv, out=out)
    return code, out.getvalue()


def test_the_demo_prints_a_line_per_phase_and_step_then_the_login_and_urls_last_in_a_box(fakes, tmp_path):
    code, out = run_demo(fakes)
    assert code == 0, out
    logs = tmp_path / "home" / "demo-logs"
    lines = out.splitlines()
    for name in ("install", "pipeline", "preprocess", "train", "evaluate", "register", "user", "serve"):
        assert sum(line.split()[:1] == [name] for line in lines) == 1, (name, out)
    timed = [line for line in lines if line.strip().split()[:1] != ["pipeline"] and line.startswith("  ")
             and not line.startswith("  |")]
    assert all(line.rstrip().endswith("s") and "m " in line for line in timed), out  # "0m 01s" on each
    assert len(lines) < 48, "two screens at most"

    box_start = next(i for i, line in enumerate(lines) if line.startswith("┌"))
    box = lines[box_start:]
    assert box[-2].startswith("└"), "the box comes last (then only the line saying the servers stopped)"
    assert lines[-1] == "stopped"
    assert all(len(line) == len(box[0]) for line in box[:-1]), "a closed box"
    text = "\n".join(box)
    for expected in ("http://127.0.0.1:8482", "s3cret-Pa55", "http://127.0.0.1:8480", "127.0.0.1:8481",
                     "pneumonia version 1 (challenger, champion)",
                     "not served: onnxruntime/int8: max |logit diff| 0.459 > 0.268", str(logs),
                     "storescu -aec PNEUMOSCOPE 127.0.0.1 8484 FILM.dcm"):
        assert expected in text, (expected, text)
    before_box = "\n".join(lines[:box_start])
    assert "s3cret-Pa55" not in before_box and "READY" not in before_box

    # every phase's whole output is in its log, the password only on the terminal
    assert "preprocess working" in (logs / "pipeline.log").read_text()
    assert "s3cret-Pa55" not in (logs / "user.log").read_text()
    assert "(shown on the terminal only)" in (logs / "user.log").read_text()
    assert "predictor starting" in (logs / "serve.log").read_text()
    assert "pip install" in (logs / "install.log").read_text()


@pytest.mark.parametrize("failing, log", [("pipeline", "pipeline.log"), ("users", "user.log"),
                                          ("serve", "serve.log")])
def test_a_failing_phase_stops_the_demo_with_the_tail_of_its_log_and_its_path(fakes, tmp_path, monkeypatch,
                                                                               failing, log):
    monkeypatch.setenv("FAKE_FAIL", failing)
    code, out = run_demo(fakes)
    assert code == 2
    path = tmp_path / "home" / "demo-logs" / log
    assert out.rstrip().endswith(f"full log: {path}")
    assert "FAILED" in out and "┌" not in out
    tail = [line[4:] for line in out.splitlines() if line.startswith("  | ")]
    assert tail == path.read_text().splitlines()[-demo.TAIL_LINES:]
    assert tail[-1].startswith("pneumoscope: error: the train step failed")
    assert "line 0" not in out and "line 39" in out, "the tail, not the whole log"


def test_kfp_local_executor_input_is_dropped_and_everything_else_passes():
    body = json.dumps({"inputs": {"parameterValues": {"data_uri": "/data", "note": "}"}}, "outputs": {}}, indent=4)
    out = io.StringIO()
    with WithoutExecutorInput(out) as stream:
        print("    [KFP Executor 12:00 INFO]: Loading KFP component", file=stream)
        print("    [KFP Executor 12:00 INFO]: Got executor_input:", file=stream)
        for line in body.splitlines():
            print("    " + line, file=stream)
        print("    [KFP Executor 12:01 INFO]: found 5232 images", file=stream)
        print("    [KFP Executor 12:02 INFO]: Got executor_input:", file=stream)  # no JSON follows
        print("    not JSON: kept", file=stream)
        stream.write("a last line without its newline")
    assert out.getvalue().splitlines() == ["    [KFP Executor 12:00 INFO]: Loading KFP component",
                                           "    [KFP Executor 12:01 INFO]: found 5232 images",
                                           "    not JSON: kept", "a last line without its newline"]


def test_a_sigterm_to_the_demo_stops_the_server_it_started(tmp_path):
    """Ctrl-C reaches the whole process group; a SIGTERM reaches the demo only (a closed session, a supervisor):
    it must pass it on, or the servers outlive the demo."""
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "server.pid"
    server = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); print('READY {}', flush=True); "
              "time.sleep(120)")
    driver = (f"import signal, sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
              "from pathlib import Path; from pipelines import demo; "
              "signal.signal(signal.SIGTERM, demo._stop_on_sigterm); "
              f"phase = demo.Phase('serve', 'a server', [sys.executable, '-c', {server!r}, {str(pid_file)!r}], "
              f"Path({str(tmp_path / 'serve.log')!r})); "
              "demo.run_phase(phase, demo.Progress(sys.stdout), on_ready=lambda _: print('up', flush=True))")
    process = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2], \
        "the server outlived the demo"
