"""``python -m gateway``: the same as ``pneumoscope gateway`` (for processes started without the entry point)."""

import sys

from gateway.cli import main

sys.exit(main())
