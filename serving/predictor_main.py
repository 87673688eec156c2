"""``python -m serving.predictor_main``: parse arguments, load the model, start kserve's ModelServer.

The kserve server flags (``--http_port``, ``--grpc_port``, ``--model_name``, ...) come from
``kserve.model_server.parser``; every serving setting is a flag of the same spelling
(``--max_batch_size``) over its ``PNEUMOSCOPE_*`` environment variable (``model.settings_cli``).
"""

import argparse
import sys

import serving.kserve_imports  # noqa: F401  (first: kserve without what the servers never use)
from kserve import model_server

from model.settings_cli import parse_settings
from serving.predictor import PneumoniaPredictor
from serving.predictor_client import MAX_RESPONSE_BYTES
from serving.protocol import transport_bytes
from serving.model_server import load_and_serve
from serving.server_logging import configure_logging
from serving.settings import ServingSettings


def parse_args(argv=None):
    parser = argparse.ArgumentParser(parents=[model_server.parser],
                                     description="pneumoscope predictor (ONNX Runtime or OpenVINO)")
    parser.add_argument("--model_uri", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS (resolved "
                        "once, now) or a bundle folder such as /mnt/models")
    parser.add_argument("--bind", default="0.0.0.0", help="listen address (the local stack uses 127.0.0.1)")
    return parse_settings(parser, ServingSettings, argv)


def main(argv=None) -> int:
    args, settings = parse_args(argv)
    configure_logging()
    model = PneumoniaPredictor(args.model_name, args.model_uri, settings)
    most_images, side = model.limits()
    return load_and_serve(model, "predictor", args, settings, transport_bytes(most_images, side), MAX_RESPONSE_BYTES)


if __name__ == "__main__":
    sys.exit(main())
