"""``python -m gedi_nesy`` runs the command line."""

import sys

from gedi_nesy.cli import main

sys.exit(main())
