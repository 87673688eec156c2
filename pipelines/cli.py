"""``pneumoscope pipeline compile | run --local | submit``.

Inputs are checked BEFORE anything slow starts (profile, data folder, MLflow store, KFP host), and
every bad input ends with one line on stderr and exit status 2 (``model.cli.main`` prints it).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from model.cli import CommandError
from model.profiles import PROFILES

IMAGE_ENV = "PNEUMOSCOPE_PIPELINE_IMAGE"
PROFILE_NAMES = ", ".join(PROFILES)


def add_commands(commands) -> None:
    pipeline = commands.add_parser(
        "pipeline", help="compile, run locally or submit the Kubeflow training pipeline",
        description="The Kubeflow pipeline preprocess -> train (1 GPU) -> evaluate -> register.")
    sub = pipeline.add_subparsers(dest="pipeline_command", metavar="SUBCOMMAND", required=True)

    comp = sub.add_parser("compile", help="write the pipeline YAML",
                          description="Compile the pipeline to KFP v2 YAML (deterministic: the same code and "
                                      "image give the same bytes).")
    comp.add_argument("--output", type=Path,
                      help="YAML file (default: the checked-in pipelines/pneumonia_training.yaml)")
    _add_image(comp)
    comp.set_defaults(func=cmd_compile)

    run = sub.add_parser("run", help="run the whole pipeline on this machine with kfp.local",
                         description="Run the pipeline with kfp.local (each step a subprocess of this Python, no "
                                     "containers, nothing installed) and print the registered model version as "
                                     "JSON on stdout; step logs go to stderr.")
    run.add_argument("--local", action="store_true", help="run with kfp.local on this machine (required; use "
                                                          "`pipeline submit` for a cluster)")
    run.add_argument("--data", help="Kaggle-layout folder or s3:// URL (default: $PNEUMOSCOPE_DATA, then "
                                    "../shared/data/chest_xray_224)")
    run.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, then "
                                          "sqlite:///$PNEUMOSCOPE_HOME/mlflow.db)")
    _add_training_args(run, default_profile=None)
    run.set_defaults(func=cmd_run)

    submit = sub.add_parser("submit", help="submit a run to a Kubeflow Pipelines server",
                            description="Compile the pipeline for --image and create a run through the KFP v2 "
                                        "REST API with kfp.Client; prints the run id as JSON.")
    submit.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT"),
                        help="KFP API URL, e.g. http://localhost:8080 after a port-forward "
                             "(default: $KF_PIPELINES_ENDPOINT)")
    submit.add_argument("--experiment", default="pneumoscope", help="experiment name (default: pneumoscope)")
    submit.add_argument("--run-name", help="run name (default: pneumonia-training <profile> <time>)")
    submit.add_argument("--namespace", help="Kubernetes namespace of a multi-user KFP")
    submit.add_argument("--service-account", help="Kubernetes service account the steps run as")
    submit.add_argument("--pipeline-root", help="artifact root, e.g. s3://bucket/pipelines (default: the server's)")
    submit.add_argument("--package", type=Path, help="submit this compiled YAML instead of compiling for --image")
    _add_image(submit)
    submit.add_argument("--data", help="data URI as the PODS see it, e.g. s3://bucket/chest_xray (required)")
    submit.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking server as the pods see it (default: $MLFLOW_TRACKING_URI)")
    _add_training_args(submit, default_profile="gpu")
    submit.set_defaults(func=cmd_submit)


def _add_image(parser) -> None:
    from components.image import DEFAULT_IMAGE

    parser.add_argument("--image", default=os.environ.get(IMAGE_ENV, DEFAULT_IMAGE),
                        help=f"container image the steps run in (default: ${IMAGE_ENV}, then {DEFAULT_IMAGE})")


def _add_training_args(parser, default_profile: str | None) -> None:
    default = default_profile or "$PNEUMOSCOPE_PROFILE, then demo"
    parser.add_argument("--profile", default=default_profile, help=f"{PROFILE_NAMES} (default: {default})")
    parser.add_argument("--epochs", type=int, help="override the profile's epochs")
    parser.add_argument("--lr", "--learning-rate", dest="lr", type=float,
                        help="override the profile's peak learning rate")
    parser.add_argument("--batch-size", type=int, help="override the profile's batch size")
    parser.add_argument("--image-size", type=int, help="override the profile's resolution")
    parser.add_argument("--seed", type=int, help="split and training seed (default: $PNEUMOSCOPE_SEED, then 42)")
    parser.add_argument("--limit-per-class", type=int, help="use only about N training images per class (smoke runs)")
    parser.add_argument("--model-name", help="registered model name (default: $PNEUMOSCOPE_MODEL_NAME, then pneumonia)")
    parser.add_argument("--promotion", default="auto", help="champion policy: auto (paired bootstrap test), always, "
                                                            "never (default: auto)")
    parser.add_argument("--threshold-method", default="youden", help="youden or sensitivity (default: youden)")
    parser.add_argument("--target-sensitivity", type=float, default=0.95,
                        help="for --threshold-method sensitivity (default: 0.95)")
    parser.add_argument("--n-bootstrap", type=int, default=1000,
                        help="bootstrap resamples for the CIs and the champion test (default: 1000)")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 ONNX variant")


# ----------------------------------------------------------------------------------------------
# input checks: one line each, before anything slow

def _check_choice(name: str, value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise CommandError(f"unknown {name} {value!r}; choose one of {', '.join(options)}")
    return value


def _check_numbers(args) -> None:
    for name in ("epochs", "batch_size", "image_size", "limit_per_class", "n_bootstrap"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "n_bootstrap" else 1):
            raise CommandError(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'n_bootstrap' else '>= 1'}, "
                               f"got {value}")
    if args.lr is not None and not args.lr > 0:
        raise CommandError(f"--lr must be > 0, got {args.lr}")


def pipeline_arguments(args, settings, data_uri: str, mlflow_uri: str) -> dict:
    """Pipeline parameters from the command line; raises one-line errors for bad values."""
    from model.profiles import get_profile

    _check_numbers(args)
    profile = get_profile(args.profile or settings.profile, epochs=args.epochs, lr=args.lr,
                          batch_size=args.batch_size, image_size=args.image_size)  # ValueError: unknown profile
    _check_choice("promotion policy", args.promotion, ("auto", "always", "never"))
    _check_choice("threshold method", args.threshold_method, ("youden", "sensitivity"))
    return {
        "data_uri": data_uri,
        "mlflow_uri": mlflow_uri,
        "profile": profile.name,
        "epochs": args.epochs or 0,
        "learning_rate": args.lr or 0.0,
        "batch_size": args.batch_size or 0,
        # resolved here, so that preprocess does not import torch just to read the profile's size
        "image_size": profile.image_size,
        "seed": settings.seed if args.seed is None else args.seed,
        "limit_per_class": args.limit_per_class or 0,
        "model_name": args.model_name or settings.model_name,
        "promotion": args.promotion,
        "threshold_method": args.threshold_method,
        "target_sensitivity": args.target_sensitivity,
        "n_bootstrap": args.n_bootstrap,
        "int8": args.int8,
    }


def local_tracking_uri(uri: str) -> str:
    """Components run as subprocesses: a relative SQLite path would depend on their working directory."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def local_data_uri(settings, explicit: str | None) -> str:
    """The data the run reads, checked now (a missing folder is one line, not a failed step later)."""
    from model.data import discover, resolve_source
    from model.settings import SHARED_DATA

    source = resolve_source(explicit or settings.data, settings.home / "downloads", SHARED_DATA)
    if "://" not in source:
        source = str(Path(source).resolve())
        discover(source)  # DataError: folder missing, class folder missing or empty
    else:
        from model.data import open_source

        open_source(source)  # DataError: bucket/prefix missing or unreadable
    return source


# ----------------------------------------------------------------------------------------------
# commands

def cmd_compile(args) -> int:
    from components.image import check_image
    from pipelines.pneumonia_training import DEFAULT_YAML, compile_pipeline

    path = compile_pipeline(args.output or DEFAULT_YAML, check_image(args.image))
    print(json.dumps({"output": str(path), "image": args.image}))
    return 0


def cmd_run(args) -> int:
    if not args.local:
        raise CommandError("`pipeline run` runs on this machine and needs --local; "
                           "for a cluster use `pneumoscope pipeline submit --host URL`")
    from model.registry import connect
    from model.settings import Settings

    settings = Settings()
    home = settings.home.resolve()
    tracking_uri = local_tracking_uri(args.mlflow_uri or settings.tracking_uri())
    arguments = pipeline_arguments(args, settings, local_data_uri(settings, args.data), tracking_uri)
    connect(tracking_uri)  # RegistryError: wrong scheme or no answer

    pipeline_root = home / "pipeline_root"
    started = time.perf_counter()
    outputs = run_local(arguments, pipeline_root)
    result = json.loads(outputs["registration"])
    result.update(pipeline_root=str(pipeline_root), seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(result))
    return 0


def run_local(arguments: dict, pipeline_root: Path) -> dict:
    """Run the pipeline with kfp.local's SubprocessRunner; step output goes to stderr. Returns its outputs."""
    from kfp import local

    from pipelines.pneumonia_training import build_pipeline

    pipeline_root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root))
    with warnings.catch_warnings(), WithoutExecutorInput(sys.stderr) as steps_log, \
            contextlib.redirect_stdout(steps_log):
        # The SubprocessRunner runs this interpreter: it ignores the image (and warns that its name lacks
        # "python") and the Kubernetes resources (and warns about each step).
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner.*")
        try:
            task = build_pipeline(retries=False)(**arguments)
        except RuntimeError as exc:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: X."
            message = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
            raise CommandError(f"{message} (the step's log is above; outputs under {pipeline_root}){_kept_hint(started)}"
                               ) from None
    return dict(task.outputs)


def _kept_hint(since: float) -> str:
    """When the register step kept the run locally (MLflow was away), how to finish it."""
    from model.kept_registration import REQUEST_FILE, kept_root
    from model.settings import Settings

    root = kept_root(Settings().home.resolve())
    kept = [p.parent.name for p in root.glob(f"*/{REQUEST_FILE}") if p.stat().st_mtime >= since] if root.is_dir() else []
    if not kept:
        return ""
    return (f"; MLflow did not take the registration: the model, its metrics and report are kept, finish with "
            f"`pneumoscope register --retry {kept[0]}`")


class WithoutExecutorInput(io.TextIOBase):
    """A text stream that passes what kfp.local prints on to ``stream``, less each step's ``Got executor_input:``
    block: the executor logs the step's whole input as indented JSON (about 90 lines a step) before the step's
    own log, and the same inputs are in the step's folder under the pipeline root. A block is the header line,
    an opening brace at its indentation, deeper lines, and the closing brace at its indentation; any other line
    ends it and is passed on."""

    def __init__(self, stream):
        self.stream = stream
        self.partial = ""
        self.header_indent: int | None = None  # inside a block: the indentation of its header
        self.opened = False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.partial = (self.partial + text).split("\n")
        for line in lines:
            if not self._in_block(line):
                self.stream.write(line + "\n")
        return len(text)

    def _in_block(self, line: str) -> bool:
        indent, text = len(line) - len(line.lstrip()), line.strip()
        header = self.header_indent
        if header is None:
            if text.endswith("Got executor_input:"):
                self.header_indent, self.opened = indent, False
                return True
            return False
        if not self.opened and text == "{" and indent == header:
            self.opened = True
            return True
        if self.opened and indent > header:
            return True
        self.header_indent = None
        return self.opened and text == "}" and indent == header

    def flush(self) -> None:
        self.stream.flush()

    def __exit__(self, *exc) -> None:
        if self.partial:
            self.stream.write(self.partial)
            self.partial = ""
        self.flush()


def cmd_submit(args) -> int:
    from components.image import check_image
    from model.settings import Settings

    settings = Settings()
    if not args.host:
        raise CommandError("--host is required (the KFP API URL, e.g. http://localhost:8080), "
                           "or set KF_PIPELINES_ENDPOINT")
    if not args.data:
        raise CommandError("--data is required: the data URI as the pipeline's pods see it "
                           "(e.g. s3://bucket/chest_xray)")
    if not args.mlflow_uri:
        raise CommandError("--mlflow-uri is required (or MLFLOW_TRACKING_URI): the MLflow server the register step "
                           "reaches from inside the cluster")
    if not re.match(r"^(https?|postgresql|mysql|mssql|databricks)(\+\w+)?://", args.mlflow_uri):
        raise CommandError(f"{args.mlflow_uri!r} cannot be reached from the cluster's pods; pass the MLflow tracking "
                           "server (http://...) or its database (postgresql://...)")
    arguments = pipeline_arguments(args, settings, args.data, args.mlflow_uri)
    if args.package and not args.package.is_file():
        raise CommandError(f"pipeline package not found: {args.package}")
    image = None if args.package else check_image(args.image)
    host = args.host.rstrip("/")
    check_kfp_host(host)

    with tempfile.TemporaryDirectory() as tmp:
        if args.package:
            package = args.package
        else:
            from pipelines.pneumonia_training import compile_pipeline

            package = compile_pipeline(Path(tmp) / "pneumonia_training.yaml", image)
        run_name = args.run_name or f"pneumonia-training {arguments['profile']} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        run = _create_run(host, package, arguments, run_name, args)
    print(json.dumps({"run_id": run.run_id, "run_name": run_name, "experiment": args.experiment,
                      "url": f"{host}/#/runs/details/{run.run_id}",
                      "image": image, "arguments": arguments}))
    return 0


def check_kfp_host(host: str, timeout: float = 5.0) -> None:
    """The KFP v2 API answers at ``host``, or one line saying why not (kfp.Client would retry for ~30 s)."""
    import httpx

    url = f"{host}/apis/v2beta1/healthz"
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        raise CommandError(f"Kubeflow Pipelines API at {host} does not answer: {exc or type(exc).__name__}") from None
    if response.status_code != 200:
        raise CommandError(f"{host} is not a reachable Kubeflow Pipelines v2 API: GET /apis/v2beta1/healthz answered "
                           f"HTTP {response.status_code}")


def _create_run(host: str, package: Path, arguments: dict, run_name: str, args):
    import kfp
    from kfp_server_api import ApiException

    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # kfp prints links on stdout
        warnings.simplefilter("ignore", FutureWarning)
        try:
            client = kfp.Client(host=host, namespace=args.namespace or "kubeflow")
            return client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name, experiment_name=args.experiment,
                namespace=args.namespace, pipeline_root=args.pipeline_root, service_account=args.service_account)
        except ApiException as exc:
            detail = (exc.body or exc.reason or "").strip().splitlines()
            raise CommandError(f"the KFP API refused the run: HTTP {exc.status} {detail[0][:300] if detail else ''}"
                               ) from None
