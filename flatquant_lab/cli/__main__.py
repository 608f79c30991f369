"""``python -m flatquant_lab.cli ...``: the same as the ``flatquant-lab`` command."""
import sys

from . import main

sys.exit(main())
