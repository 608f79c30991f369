#!/usr/bin/env python3
"""Rebuild the bundled Wikipedia text data; same as `flatquant-lab build-data` (see data/README.md).

The implementation is flatquant_lab.wikidata; this script only makes it runnable from a checkout.
"""
import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flatquant_lab.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["build-data", *sys.argv[1:]]))
