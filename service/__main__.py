"""``python -m service``: the same as ``dflare serve``."""

import sys

from service.cli import main

sys.exit(main(sys.argv[1:]))
