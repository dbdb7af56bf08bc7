"""The mount's configuration: one frozen dataclass, built by parse_argv().

Everything the daemon needs to know is in Config; nothing else reads argv.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

IdMap = Tuple[Tuple[int, int, int], ...]   # (id inside the mount, id in the layers, length)


class ConfigError(Exception):
    """Bad input from the user. The CLI prints str(e) on one line and exits 1."""


@dataclass(frozen=True)
class Config:
    lowers: Tuple[str, ...]              # absolute real paths, top layer first
    mountpoint: str                      # absolute path
    upper: Optional[str] = None          # None -> read-only mount
    work: Optional[str] = None
    foreground: bool = False
    debug: bool = False
    fsync: bool = True                   # False with fsync=0 or volatile
    volatile: bool = False
    read_only: bool = False              # 'ro' given, or no upperdir
    uidmap: IdMap = ()
    gidmap: IdMap = ()
    allow_other: bool = False
    default_permissions: bool = True
    fsname: str = "overlayfs-py"
    metacopy: bool = False
    userxattr: bool = False              # use user.overlay.* instead of trusted.overlay.*
    timeout: float = 86400.0             # entry/attr cache timeout, seconds
    writeback: bool = True               # FUSE writeback cache
    keep_cache: bool = True              # keep page cache across opens of unchanged files
    extra_fuse_options: Tuple[str, ...] = field(default_factory=tuple)  # dev,suid,noatime...

    @property
    def writable(self) -> bool:
        return self.upper is not None and not self.read_only
