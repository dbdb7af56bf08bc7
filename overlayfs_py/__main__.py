"""python -m overlayfs_py == overlayfs-py."""

from overlayfs_py.cli import run_main

if __name__ == "__main__":
    run_main()
