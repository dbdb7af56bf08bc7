#!/usr/bin/env python3
"""Performance yardstick for overlayfs-py: `make bench`, `make bench-quick`, or run this file
(as root) with --help. The harness is the package ovlbench/ beside it; see README.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ovlbench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
