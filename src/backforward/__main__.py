"""``python -m backforward`` (and ``torchrun -m backforward``) run the command line."""

import sys

from .cli import main

sys.exit(main())
