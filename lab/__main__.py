"""`python -m lab` (from the repository root, as `./dev.sh lab` runs it): the lab's command line."""

import sys

from lab.cli import main

sys.exit(main())
