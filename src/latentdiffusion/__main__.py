"""`python -m latentdiffusion ...` is the `ldm` command."""

import sys

from .cli import main

sys.exit(main())
