"""`python -m jaxcomp ...` runs the command-line interface (see `jaxcomp.cli`)."""

import sys

from jaxcomp.cli import main

sys.exit(main())
