"""``python -m backforward.experiments`` (and ``torchrun -m backforward.experiments``) run the command line."""

import signal
import sys

from .cli import main

code = main()
# Leaving with `code` now: a late SIGTERM (torchrun stopping the other ranks once one has exited) must not
# turn a rank's exit status 2 into death by signal.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.exit(code)
