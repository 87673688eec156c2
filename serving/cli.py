"""``pneumoscope serve`` and ``pneumoscope predict`` (plugged into ``model.cli`` by entry point).

Nothing heavy is imported here: ``model.cli`` builds every command's parser on each invocation.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from pathlib import Path


def _stack_port(text: str) -> int:
    import argparse

    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65534:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65534 (gRPC takes PORT+1), not {port}")
    return port


def add_stack_arguments(parser) -> None:
    """The flags of a local serving stack: ``serve``'s, and those of ``rollout serve-local`` (the traffic
    split that ``serve --traffic-split`` hands over to), so that one namespace suits both."""
    from model.settings_cli import add_settings_flags
    from serving.settings import ServingSettings

    parser.add_argument("--model", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS (resolved once, at "
                                                       "start) or a bundle folder (with --sha256)")
    parser.add_argument("--port", type=_stack_port, default=8080,
                        help="transformer REST port; gRPC uses PORT+1 (default 8080)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument("--log-file", help="write the servers' logs here instead of stderr")
    parser.add_argument("--canary", metavar="MODEL_URI", help="also serve models:/NAME/N as a canary beside --model, "
                                                              "behind the traffic split")
    parser.add_argument("--canary-percent", type=int, default=10, help="share of the traffic for --canary (1-99, "
                                                                       "default 10)")
    parser.add_argument("--force", action="store_true", help="with --canary: serve it even though it did not pass "
                                                             "its evaluation gate (as `rollout canary --force`)")
    # No --model-cache: the stack gives each child a download folder of its own.
    add_settings_flags(parser.add_argument_group(
        "serving settings", "each also read from its environment variable; a flag wins over it"), ServingSettings,
        exclude=("model_cache",))


def add_commands(commands) -> None:
    serve = commands.add_parser(
        "serve", help="serve a model locally (transformer + predictor)",
        description="Start the predictor (ONNX Runtime or OpenVINO) and the transformer (decode, gate, heatmap) as "
                    "two processes on 127.0.0.1: the transformer's REST API on PORT, its gRPC API on PORT+1, the "
                    "predictor on free ports, and the doctor's web app on PORT+2 (see `pneumoscope web`). Prints one "
                    "line `READY {json}` when everything answers; Ctrl-C or SIGTERM drains and stops them all, the "
                    "web app and the transformer first. Defaults come from PNEUMOSCOPE_* environment variables.")
    add_stack_arguments(serve)
    serve.add_argument("--web-port", type=int, help="web app port (default PORT+2)")
    serve.add_argument("--no-web", action="store_true", help="do not start the web app")
    serve.add_argument("--gateway-port", type=int, metavar="P",
                       help="also start the DICOM gateway (`pneumoscope gateway`): its Storage SCP on 127.0.0.1:P, "
                            "AE title PNEUMOSCOPE; films it receives are scored and recorded in the web app; results "
                            "go back where PNEUMOSCOPE_GATEWAY_SEND_TO says")
    serve.add_argument("--traffic-split", action="store_true",
                       help="a real nginx on PORT (REST) and PORT+1 (gRPC) in front of one stack per model version, "
                            "splitting traffic by weight: what `pneumoscope rollout ... --local` drives (no web app); "
                            "the same as `pneumoscope rollout serve-local`")
    serve.set_defaults(func=cmd_serve)

    predict = commands.add_parser(
        "predict", help="classify an image with a running server",
        description="Send IMAGE (JPEG, PNG or DICOM) to a pneumoscope transformer and print the result.")
    predict.add_argument("image", metavar="IMAGE", help="image file")
    predict.add_argument("--url", default="http://127.0.0.1:8080",
                         help="server address: http://HOST:PORT for v1/v2, HOST:PORT (the gRPC port) for grpc")
    predict.add_argument("--protocol", choices=["v1", "v2", "grpc"], default="v2")
    predict.add_argument("--host", help="Host header (gRPC: :authority) for an ingress that routes by host name, "
                                        "e.g. pneumonia.NAMESPACE.example.com")
    predict.add_argument("--model-name", default="pneumonia")
    predict.add_argument("--patient-age", metavar="AGE",
                         help="the patient's age: years, or a DICOM age string such as 045Y or 030M (a DICOM file's "
                              "own Patient's Age is read by the server; this wins over it)")
    predict.add_argument("--heatmap", metavar="OUT_PNG", help="also fetch the heatmap and write it here")
    predict.add_argument("--json", action="store_true", help="print one JSON object")
    predict.add_argument("--timeout", type=float, default=60.0)
    predict.set_defaults(func=cmd_predict)

    from serving.modelcar import add_command as add_export_modelcar

    add_export_modelcar(commands)


def _quiet_http_logs() -> None:
    import logging

    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_serve(args) -> int:
    from model.cli import CommandError, handler_of
    from model.settings_cli import settings_from_args
    from serving.settings import ServingSettings
    from serving.stack import LocalStack, StackError, ready_line

    _quiet_http_logs()
    if args.force and not args.canary:
        raise CommandError("--force applies to --canary only (the version given to --model is served as it is)")
    if args.traffic_split or args.canary:
        # The split is rollout's (nginx, one stack per version, the rollout state); serving sits below rollout.
        return handler_of("rollout", "serve-local")(args)
    web_port = None if args.no_web else (args.web_port or args.port + 2)
    if web_port is not None and not 1 <= web_port <= 65535:
        raise CommandError(f"--web-port must be between 1 and 65535, not {web_port}")
    if args.gateway_port is not None and not 1 <= args.gateway_port <= 65535:
        raise CommandError(f"--gateway-port must be between 1 and 65535, not {args.gateway_port}")
    settings = settings_from_args(ServingSettings, args)
    if settings.engine != "auto":  # say so now, not after the predictor process failed to start
        from serving.engine import EngineError, require

        try:
            require(settings.engine)
        except EngineError as exc:
            raise CommandError(str(exc)) from None
    stack = LocalStack(args.model, args.port, settings, log_file=args.log_file, restart=True, web_port=web_port,
                       gateway_port=args.gateway_port)
    stopping = threading.Event()

    def on_signal(signum, frame):
        stopping.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            info = stack.start(timeout=args.startup_timeout, supervise_in_background=True)
        except StackError as exc:
            raise CommandError(str(exc)) from None
        print(ready_line(info), flush=True)
        while not stopping.wait(0.5):
            pass
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stack.stop()
        signal.signal(signal.SIGTERM, previous)


def cmd_predict(args) -> int:
    from model.cli import CommandError
    from serving.client import ClientError, predict

    _quiet_http_logs()
    path = Path(args.image)
    if not path.is_file():
        raise CommandError(f"image not found: {path}")
    try:
        result = predict(args.url, path.read_bytes(), args.protocol, args.model_name, bool(args.heatmap),
                         args.timeout, host=args.host, patient_age=args.patient_age)
    except ClientError as exc:
        raise CommandError(str(exc)) from None
    png = result.pop("heatmap_png", None)
    if args.heatmap:
        if png is None:
            raise CommandError("the server returned no heatmap")
        Path(args.heatmap).write_bytes(png)
        result["heatmap"] = str(args.heatmap)
    result["file"] = str(path)
    if args.json:
        print(json.dumps(result))
    else:
        extra = f"  heatmap -> {args.heatmap}" if args.heatmap else ""
        score = "n/a" if result["ood_score"] is None else f"{result['ood_score']:.2f}"
        use = "within the intended use" if result["in_intended_use"] else "OUTSIDE the intended use"
        print(f"{path.name}: {result['decision']}  (label {result['label']}, probability {result['probability']:.4f}, "
              f"threshold {result['threshold']:.4f}; {use}, out-of-distribution score {score}; "
              f"{result['model_name']} version {result['model_version']}){extra}")
        for reason in result["refer_reasons"]:
            print(f"  refer ({reason['code']}): {reason['text']}")
        if (result.get("intended_use") or {}).get("demonstration"):
            print(f"  note: a demonstration model (profile {result['intended_use'].get('profile')}), not for "
                  "clinical use")
    sys.stdout.flush()
    return 0
