"""``python -m webapp [--host H] [--port P]``: the same as ``pneumoscope web``."""

import sys

from model.cli import main

if __name__ == "__main__":
    sys.exit(main(["web", *sys.argv[1:]]))
