"""``python -m serving.transformer_main``: parse arguments, start kserve's ModelServer.

The transformer holds no model version (the predictor owns it), so it takes no model URI. It uses
kserve's own ``--predictor_host`` and ``--predictor_protocol`` (``grpc-v2`` or ``v2``); the model is
registered under ``--model_name`` (default ``pneumonia``), the name it forwards under, so the
predictor must use the same name.
"""

import argparse
import sys

import serving.kserve_imports  # noqa: F401  (first: kserve without what the servers never use)
from kserve import model_server

from model.settings_cli import parse_settings
from serving.model_server import load_and_serve
from serving.server_logging import configure_logging
from serving.settings import ServingSettings
from serving.transformer import PneumoniaTransformer

#: A heatmap PNG of at most 512x512 (base64) plus its CAM, per image.
RESPONSE_BYTES_PER_IMAGE = 1_500_000


def parse_args(argv=None):
    parser = argparse.ArgumentParser(parents=[model_server.parser], description="pneumoscope transformer")
    parser.add_argument("--bind", default="0.0.0.0", help="listen address (the local stack uses 127.0.0.1)")
    args, settings = parse_settings(parser, ServingSettings, argv)
    if not args.predictor_host:
        parser.error("--predictor_host is required (host:port of the predictor's gRPC or REST endpoint)")
    return args, settings


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    configure_logging()
    model = PneumoniaTransformer(args.model_name, args.predictor_host, args.predictor_protocol, settings)
    return load_and_serve(model, "transformer", args, settings, settings.max_payload_bytes,
                          settings.max_images_per_request * RESPONSE_BYTES_PER_IMAGE + 1_000_000)


if __name__ == "__main__":
    sys.exit(main())
