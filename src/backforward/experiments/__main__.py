"""``python -m backforward.experiments`` (and ``torchrun -m backforward.experiments``) run the command line."""

import sys

from .cli import main

sys.exit(main())
