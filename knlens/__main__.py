"""``python -m knlens`` runs the command line (see :mod:`knlens.cli`)."""

import sys

from knlens.cli import main

sys.exit(main())
