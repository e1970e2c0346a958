"""`python -m igd.server` runs igd-server."""

import sys

from igd.server.cli import main

sys.exit(main())
