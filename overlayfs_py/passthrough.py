"""FUSE passthrough: which opens the kernel serves directly from a backing file, and the
backing ids behind them (``passthrough=auto|on|off``).

With passthrough the kernel reads, writes, splices and mmaps an open file directly on the
backing file the daemon registered (Linux >= 6.9, libfuse >= 3.16, our pyfuse3 patch 0011):
no request and no copy through Python. Two rules of the kernel shape what we do:

- An open is bound to its backing file for good, and all passthrough opens of one FUSE
  inode must share one backing file (one backing id per node, counted here, closed with
  the last open); an inode with cached (non-passthrough) opens refuses a passthrough open
  and the reverse (ETXTBSY), so a node is in one mode or the other while it is open.
- There is no writeback cache on a passthrough connection (the kernel drops passthrough
  if both are asked for): it is one or the other per mount.

Which opens get passthrough (``eligible``): a file whose data is in the upper layer (it can
never be copied up again, so the binding is right for as long as the open lasts), and any
file of a mount without an upper layer. A read-only open of a lower file (or of a metacopy
file, whose data is still lower) on a writable mount stays on the daemon's path: the
kernel overlay moves such a reader to the upper copy when another process copies the file
up (since 4.19), and a passthrough open could not move -- it would keep reading the lower
file. The cost is that reading lower files of a writable mount goes through the daemon as
before (its page cache, then one request per MiB); an open of a node that already has such
a reader also stays cached, by the first rule.

Access times: the kernel opens the backing file with the caller's flags, so reads through a
passthrough open update the backing file's atime by the rules of the file system the layer
is on, not ours (atime.py). The kernel overlay never touches a lower file's atime, and keeps
an upper file's by the overlay mount's relatime/strictatime/noatime (never on a read-only
mount). So an open that can read passes through only where the two agree
(``_atime_agrees``): a lower layer on a read-only or noatime mount; an upper layer whose
mount has the same atime rule as ours (the usual case: relatime on both). Write-only opens
never touch the atime.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import pyfuse3

from .config import Config
from .inodes import Node
from .overlay import UPPER

log = logging.getLogger("overlayfs_py")

MIN_KERNEL = (6, 9)
CAP_SYS_ADMIN = 21
ST_RDONLY, ST_NOATIME, ST_RELATIME = 0x1, 0x400, 0x1000


class Backing:
    """The backing id of a node and the passthrough opens that use it."""
    __slots__ = ("id", "opens", "writers")

    def __init__(self, backing_id: int):
        self.id, self.opens, self.writers = backing_id, 0, 0


def _kernel_version() -> Tuple[int, int]:
    try:
        parts = os.uname().release.split(".")
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (ValueError, IndexError):
        return (0, 0)


def _has_cap_sys_admin() -> bool:
    """CAP_SYS_ADMIN in the initial user namespace: FUSE_DEV_IOC_BACKING_OPEN needs it."""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
        with open("/proc/self/uid_map") as f:
            initial_ns = f.read().split() == ["0", "0", "4294967295"]
    except (OSError, StopIteration, ValueError):
        return False
    return bool(eff >> CAP_SYS_ADMIN & 1) and initial_ns


def why_not(config: Config) -> Optional[str]:
    """Why passthrough cannot be used for this mount, or None if it can be tried."""
    if config.passthrough == "off":
        return "passthrough=off"
    if not hasattr(pyfuse3, "passthrough_open"):
        return "this pyfuse3 has no passthrough API (vendor/pyfuse3 patch 0011)"
    if config.passthrough == "auto" and config.writeback and config.writeback_explicit:
        return "writeback=1 was asked for, and the kernel has no writeback cache on a " \
               "passthrough connection"
    if _kernel_version() < MIN_KERNEL:
        return f"Linux {os.uname().release} has no FUSE passthrough (it came in 6.9)"
    if not _has_cap_sys_admin():
        return "the kernel allows FUSE passthrough only to a daemon with CAP_SYS_ADMIN " \
               "(in the initial user namespace)"
    return None


def _atime_agrees(fd: int, atime_kept: bool, atime_mode: str) -> bool:
    """Whether reads through a passthrough open of a file in the layer of ``fd`` change its
    atime as the overlay must: as ``atime_mode`` if ``atime_kept`` (a writable upper layer),
    else never."""
    try:
        f = os.fstatvfs(fd).f_flag
    except OSError:
        return False
    host = "noatime" if f & (ST_RDONLY | ST_NOATIME) else \
        "relatime" if f & ST_RELATIME else "strictatime"
    return host == (atime_mode if atime_kept else "noatime")


def log_off(reason: str) -> None:
    """Once per mount, why passthrough=auto is off: at info level where that is by design
    (not root, the writeback cache asked for), as a warning where something is missing."""
    deliberate = reason.startswith(("passthrough=off", "writeback=1", "the kernel allows"))
    (log.info if deliberate else log.warning)("FUSE passthrough off: %s", reason)


class Passthrough:
    """Backing ids per node for one mount (``ops.Operations`` owns one when passthrough was
    granted at INIT)."""

    def __init__(self, writable_mount: bool, layer_fds, atime_mode: str):
        self.writable_mount = writable_mount
        self._failed: set = set()           # errnos already logged
        self._readable_ok = [_atime_agrees(fd, i == UPPER and writable_mount, atime_mode)
                             for i, fd in enumerate(layer_fds)]

    def eligible(self, node: Node, flags: int = os.O_RDONLY) -> bool:
        if node.handles and not node.backing:
            return False                     # cached opens: the kernel would refuse it
        if node.backing:
            return True                      # the node's opens already pass through
        if self.writable_mount and node.layers != (UPPER,):
            return False                     # lower or metacopy data on a writable mount
        return (flags & os.O_ACCMODE) == os.O_WRONLY or self._readable_ok[node.layers[-1]]

    def open(self, node: Node, fd: int, writable: bool, flags: int) -> int:
        """The backing id for a new open of ``node`` through ``fd`` (opened for ``flags``);
        0: a cached open."""
        if not self.eligible(node, flags):
            return 0
        b = node.backing
        if not b:
            try:
                b = node.backing = Backing(pyfuse3.passthrough_open(fd))
            except OSError as e:
                if e.errno not in self._failed:
                    self._failed.add(e.errno)
                    log.warning("passthrough refused for %r (%s); such files go through "
                                "the daemon", node, e)
                return 0
        b.opens += 1
        if writable:
            b.writers += 1
        return b.id

    def release(self, node: Node, writable: bool) -> None:
        b = node.backing
        if not b:
            return
        b.opens -= 1
        if writable:
            b.writers -= 1
        if b.opens == 0:
            node.backing = False             # was passed through: see Operations._file_info
            try:
                pyfuse3.passthrough_close(b.id)
            except OSError as e:
                log.warning("passthrough_close(%d): %s", b.id, e)
