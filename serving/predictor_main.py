"""``python -m serving.predictor_main``: parse arguments, load the model, start kserve's ModelServer.

The kserve server flags (``--http_port``, ``--grpc_port``, ``--model_name``, ...) come from
``kserve.model_server.parser``; the model flags default to the ``PNEUMOSCOPE_*`` settings.
"""

import argparse
import sys

from kserve import model_server

from model.bundle import BundleError
from model.registry import RegistryError
from serving.predictor import PneumoniaPredictor
from serving.server import PneumoscopeModelServer, configure_logging
from serving.settings import ServingSettings

PREDICTOR_MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # N x 1 x S x S float32 tensors


def parse_args(argv=None):
    settings = ServingSettings()
    parser = argparse.ArgumentParser(parents=[model_server.parser], description="pneumoscope predictor (ONNX Runtime)")
    parser.set_defaults(model_name=settings.model_name)
    parser.add_argument("--model_uri", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS (resolved "
                        "once, now) or a bundle folder such as /mnt/models")
    parser.add_argument("--precision", default=settings.precision, choices=["auto", "fp32", "int8"])
    parser.add_argument("--threads", type=int, default=settings.threads, help="ORT intra-op threads")
    parser.add_argument("--engine_streams", type=int, default=settings.engine_streams,
                        help="parallel single-threaded engine runs under load (default: = threads)")
    parser.add_argument("--max_batch_size", type=int, default=settings.max_batch_size)
    parser.add_argument("--max_batch_delay_ms", type=float, default=settings.max_batch_delay_ms)
    parser.add_argument("--mlflow_tracking_uri", default=settings.mlflow_tracking_uri)
    parser.add_argument("--bind", default="0.0.0.0", help="listen address (the local stack uses 127.0.0.1)")
    args = parser.parse_args(argv)
    settings = settings.model_copy(update={k: getattr(args, k) for k in (
        "precision", "threads", "engine_streams", "max_batch_size", "max_batch_delay_ms", "mlflow_tracking_uri")})
    return args, settings


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    configure_logging()
    model = PneumoniaPredictor(args.model_name, args.model_uri, settings)
    try:
        model.load()
    except (RegistryError, BundleError, FileNotFoundError) as exc:
        print(f"pneumoscope predictor: error: {exc}", file=sys.stderr)
        return 2
    server = PneumoscopeModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=args.workers,
                                    enable_grpc=args.enable_grpc, max_body_bytes=PREDICTOR_MAX_MESSAGE_BYTES,
                                    grpc_max_message_bytes=PREDICTOR_MAX_MESSAGE_BYTES, access_log=settings.access_log,
                                    bind=args.bind)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
