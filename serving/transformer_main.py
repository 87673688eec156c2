"""``python -m serving.transformer_main``: parse arguments, start kserve's ModelServer.

The transformer holds no model version (the predictor owns it), so it takes no model URI. It uses
kserve's own ``--predictor_host`` and ``--predictor_protocol`` (``grpc-v2`` or ``v2``); the model is
registered under ``--model_name`` (default ``pneumonia``), the name it forwards under, so the
predictor must use the same name.
"""

import argparse
import sys

from kserve import model_server

from serving.model_server import load_and_serve
from serving.server_logging import configure_logging
from serving.settings import ServingSettings
from serving.transformer import PneumoniaTransformer

#: A heatmap PNG of at most 512x512 (base64) plus its CAM, per image.
RESPONSE_BYTES_PER_IMAGE = 1_500_000


def parse_args(argv=None):
    settings = ServingSettings()
    parser = argparse.ArgumentParser(parents=[model_server.parser], description="pneumoscope transformer")
    parser.set_defaults(model_name=settings.model_name, predictor_protocol=settings.predictor_protocol)
    parser.add_argument("--max_payload_bytes", type=int, default=settings.max_payload_bytes)
    parser.add_argument("--max_image_pixels", type=int, default=settings.max_image_pixels)
    parser.add_argument("--max_request_pixels", type=int, default=settings.max_request_pixels)
    parser.add_argument("--max_images_per_request", type=int, default=settings.max_images_per_request)
    parser.add_argument("--predictor_timeout_s", type=float, default=settings.predictor_timeout_s)
    parser.add_argument("--max_inflight", type=int, default=settings.max_inflight,
                        help="requests worked on at once; more get 503 / RESOURCE_EXHAUSTED at once")
    parser.add_argument("--drain_timeout_s", type=float, default=settings.drain_timeout_s,
                        help="on SIGTERM, how long requests in flight may take to finish")
    parser.add_argument("--bind", default="0.0.0.0", help="listen address (the local stack uses 127.0.0.1)")
    args = parser.parse_args(argv)
    if not args.predictor_host:
        parser.error("--predictor_host is required (host:port of the predictor's gRPC or REST endpoint)")
    if args.predictor_protocol not in ("grpc-v2", "v2"):
        parser.error("--predictor_protocol must be grpc-v2 or v2 (the predictor speaks Open Inference Protocol v2)")
    settings = settings.model_copy(update={k: getattr(args, k) for k in (
        "max_payload_bytes", "max_image_pixels", "max_request_pixels", "max_images_per_request",
        "predictor_timeout_s", "max_inflight", "drain_timeout_s")})
    return args, settings


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    configure_logging()
    model = PneumoniaTransformer(args.model_name, args.predictor_host, args.predictor_protocol, settings)
    return load_and_serve(model, "transformer", args, settings, settings.max_payload_bytes,
                          settings.max_images_per_request * RESPONSE_BYTES_PER_IMAGE + 1_000_000)


if __name__ == "__main__":
    sys.exit(main())
