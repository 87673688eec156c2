"""``pneumoscope gateway`` (plugged into ``model.cli`` by entry point; ``python -m gateway`` runs it alone).

Nothing heavy is imported at module level: ``model.cli`` builds every command's parser on each call.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

#: The web app's settings the gateway uses: where studies live, and how the transformer is reached.
WEB_SETTINGS = ("home", "database_url", "image_store", "inference_url", "inference_host", "model_name",
                "inference_timeout_s", "deidentify_dicom")


def add_commands(commands) -> None:
    from model.settings_cli import add_settings_flags
    from webapp.settings import WebSettings

    from gateway.settings import GatewaySettings

    gateway = commands.add_parser(
        "gateway", help="the DICOM gateway: films from a PACS, results back to it",
        description="Receive chest X-rays from a PACS (a DICOM Storage SCP; or --pull URL: poll a DICOMweb service), "
                    "score them with the transformer, record them in the web app's database (source PACS), and send "
                    "the results back into the film's study: a Structured Report, the heatmap as a Secondary "
                    "Capture and the report as an Encapsulated PDF (--send-to: STOW-RS or C-STORE). Prints one line "
                    "`READY {json}` when it listens; SIGTERM stops it. Settings come from PNEUMOSCOPE_GATEWAY_* (and "
                    "the web app's PNEUMOSCOPE_* for the database, the store and the transformer) under these flags.")
    add_settings_flags(gateway.add_argument_group("gateway settings"), GatewaySettings)
    add_settings_flags(gateway.add_argument_group("where studies are recorded, and the transformer"), WebSettings,
                       only=WEB_SETTINGS)
    gateway.add_argument("--retry-refused", action="store_true",
                         help="at start, queue again the results the PACS refused for good (STOW-RS 409, a C-STORE "
                              "failure), once their cause is fixed")
    gateway.set_defaults(func=cmd_gateway)


def cmd_gateway(args) -> int:
    from model.cli import CommandError
    from model.settings_cli import settings_from_args
    from webapp.settings import WebSettings

    from gateway.service import Gateway, GatewayError
    from gateway.settings import GatewaySettings

    gateway = Gateway(settings_from_args(GatewaySettings, args), settings_from_args(WebSettings, args))
    stopping = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        try:
            info = gateway.start()
        except GatewayError as exc:
            raise CommandError(str(exc)) from None
        if args.retry_refused:
            info["requeued"] = gateway.outbox.retry_failed()
        print("READY " + json.dumps(info, sort_keys=True), flush=True)
        while not stopping.wait(0.5):
            pass
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        gateway.stop()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway [FLAGS]``: the gateway command alone, with model.cli's error handling."""
    from model.cli import OneLineErrorParser, main as pneumoscope_main

    parser = OneLineErrorParser(prog="pneumoscope")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_commands(parser.add_subparsers(dest="command", required=True))
    argv = sys.argv[1:] if argv is None else argv
    if "gateway" not in argv:
        argv = ["gateway", *argv]
    return pneumoscope_main(argv, parser=parser)
