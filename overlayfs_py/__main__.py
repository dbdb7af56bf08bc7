"""python -m overlayfs_py == overlayfs-py."""
import sys

from overlayfs_py.cli import main

if __name__ == "__main__":
    sys.exit(main())
