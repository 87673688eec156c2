"""``python -m serving.predictor_main``: parse arguments, load the model, start kserve's ModelServer.

The kserve server flags (``--http_port``, ``--grpc_port``, ``--model_name``, ...) come from
``kserve.model_server.parser``; the model flags default to the ``PNEUMOSCOPE_*`` settings.
"""

import argparse
import sys

from kserve import model_server

from serving.predictor import PneumoniaPredictor
from serving.predictor_client import MAX_RESPONSE_BYTES
from serving.protocol import transport_bytes
from serving.model_server import load_and_serve
from serving.server_logging import configure_logging
from serving.settings import ServingSettings


def parse_args(argv=None):
    settings = ServingSettings()
    parser = argparse.ArgumentParser(parents=[model_server.parser],
                                     description="pneumoscope predictor (ONNX Runtime or OpenVINO)")
    parser.set_defaults(model_name=settings.model_name)
    parser.add_argument("--model_uri", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS (resolved "
                        "once, now) or a bundle folder such as /mnt/models")
    parser.add_argument("--sha256", default=settings.model_sha256,
                        help="expected bundle digest (PNEUMOSCOPE_MODEL_SHA256): required for a folder, checked "
                             "against the registry's bundle_sha256 tag for models:/ URIs")
    parser.add_argument("--engine", default=settings.engine, choices=["auto", "onnxruntime", "openvino"],
                        help="auto: gate and time every installed engine at load, serve the fastest eligible one")
    parser.add_argument("--precision", default=settings.precision, choices=["auto", "fp32", "int8", "bf16"])
    parser.add_argument("--threads", type=int, default=settings.threads, help="engine intra-op threads")
    parser.add_argument("--engine_streams", type=int, default=settings.engine_streams,
                        help="parallel single-threaded engine runs under load (default: = threads)")
    parser.add_argument("--max_batch_size", type=int, default=settings.max_batch_size)
    parser.add_argument("--max_batch_delay_ms", type=float, default=settings.max_batch_delay_ms)
    parser.add_argument("--max_inflight", type=int, default=settings.max_inflight,
                        help="requests worked on at once; more get 503 / RESOURCE_EXHAUSTED at once")
    parser.add_argument("--drain_timeout_s", type=float, default=settings.drain_timeout_s,
                        help="on SIGTERM, how long requests in flight may take to finish")
    parser.add_argument("--mlflow_tracking_uri", default=settings.mlflow_tracking_uri)
    parser.add_argument("--bind", default="0.0.0.0", help="listen address (the local stack uses 127.0.0.1)")
    args = parser.parse_args(argv)
    settings = settings.model_copy(update={k: getattr(args, k) for k in (
        "engine", "precision", "threads", "engine_streams", "max_batch_size", "max_batch_delay_ms", "max_inflight",
        "drain_timeout_s", "mlflow_tracking_uri")} | {"model_sha256": args.sha256})
    return args, settings


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    configure_logging()
    model = PneumoniaPredictor(args.model_name, args.model_uri, settings)
    most_images, side = model.limits()
    return load_and_serve(model, "predictor", args, settings, transport_bytes(most_images, side), MAX_RESPONSE_BYTES)


if __name__ == "__main__":
    sys.exit(main())
