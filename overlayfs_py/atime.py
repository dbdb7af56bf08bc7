"""Access times, as the kernel overlay keeps them.

The kernel overlay updates the atime of an upper file when it is read, as the overlay
mount's ``relatime`` (default), ``strictatime`` or ``noatime`` says, and never the atime of
a lower file, nor anything on a read-only mount. FUSE leaves atime to the daemon and serves
cached pages without telling it, so:

- every backing file is opened with O_NOATIME (``open_noatime``): the daemon's own reads
  (of a lower file, a copy-up, a cached read-ahead) never move an atime;
- when a file of the upper layer is opened read-only and the mount's policy says its atime
  is due (``due``), the open drops the file's cached pages so that its first read reaches
  the daemon, which then reads one byte through a strictatime clone of the upper mount
  (``Toucher``): the upper filesystem sets the atime itself, to the time of the read, and
  leaves ctime alone (utimensat would change it).
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Optional

from . import fhandle

log = logging.getLogger("overlayfs_py")

RELATIME, STRICTATIME, NOATIME = "relatime", "strictatime", "noatime"
_DAY_NS = 24 * 3600 * 10**9


def due(mode: str, st: os.stat_result, now_ns: int) -> bool:
    """Whether a read now updates the atime (the kernel's atime_needs_update)."""
    if mode == NOATIME:
        return False
    atime = st.st_atime_ns
    if mode == RELATIME and not (st.st_mtime_ns >= atime or st.st_ctime_ns >= atime or
                                 now_ns - atime >= _DAY_NS):
        return False
    return atime != now_ns


def open_noatime(name, flags: int, dir_fd: int, mode: int = 0o777) -> int:
    """os.open with O_NOATIME, without it where we may not use it (not the owner and no
    CAP_FOWNER: a rootless daemon on others' files)."""
    try:
        return os.open(name, flags | os.O_NOATIME, mode, dir_fd=dir_fd)
    except PermissionError:
        return os.open(name, flags, mode, dir_fd=dir_fd)


class Toucher:
    """Makes the upper filesystem record a read of a file (see the module docstring)."""

    def __init__(self, upper_root_fd: int):
        self.clone: Optional[int] = fhandle.strictatime_clone(upper_root_fd)
        if self.clone is None:
            log.debug("atime: no strictatime clone of the upper mount; reads are recorded "
                      "as the upper mount's own atime policy allows")

    def touch(self, fd: int) -> None:
        """Record a read of the file open at ``fd`` (an upper file)."""
        other = None
        try:
            if self.clone is not None:
                try:
                    other = fhandle.open_by_handle(self.clone, fhandle.encode(fd),
                                                   os.O_RDONLY)
                except OSError as e:
                    log.debug("atime: through the clone: %s", e)
            if other is None:
                other = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            os.pread(other, 1, 0)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ESTALE, errno.EACCES, errno.EPERM):
                raise
            log.debug("atime not recorded: %s", e)
        finally:
            if other is not None:
                os.close(other)

    def close(self) -> None:
        if self.clone is not None:
            os.close(self.clone)
            self.clone = None
