"""``python -m virnucpro``: the same as the ``virnucpro`` command."""

import sys

from virnucpro.cli import main

sys.exit(main())
