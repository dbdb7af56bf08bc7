"""Listing one layer's directory into (name, kind) pairs for lookup.merge_listings.

One ``scandir`` per layer per directory: d_type answers most entries for free; only character
devices (possible whiteouts) and, in dirs marked opaque=x, empty files (possible xattr whiteouts)
cost an extra syscall.
"""
from __future__ import annotations

import os
import stat
from typing import List, Tuple

from . import whiteout
from .lookup import DIR, NONDIR, WHITEOUT


def scan_layer_dir(dir_fd: int) -> List[Tuple[bytes, str]]:
    """Entries of the directory open at dir_fd, whiteouts decoded, markers dropped."""
    out: List[Tuple[bytes, str]] = []
    xwh = None
    with os.scandir(dir_fd) as it:
        for entry in it:
            name = os.fsencode(entry.name)
            if name.startswith(whiteout.WH_PREFIX):
                target = whiteout.oci_whiteout_target(name)
                if target is not None:
                    out.append((target, WHITEOUT))
                continue                 # .wh..wh..opq and AUFS internals are never entries
            if entry.is_dir(follow_symlinks=False):
                out.append((name, DIR))
                continue
            if entry.is_symlink():
                out.append((name, NONDIR))
                continue
            if entry.is_file(follow_symlinks=False):
                if xwh is None:
                    xwh = whiteout.dir_has_xwhiteouts(dir_fd)
                if xwh:
                    st = entry.stat(follow_symlinks=False)
                    if st.st_size == 0 and whiteout.is_xwhiteout(
                            f"/proc/self/fd/{dir_fd}/{entry.name}"):
                        out.append((name, WHITEOUT))
                        continue
                out.append((name, NONDIR))
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if whiteout.is_kernel_whiteout(st):
                out.append((name, WHITEOUT))
            else:
                out.append((name, DIR if stat.S_ISDIR(st.st_mode) else NONDIR))
    return out
