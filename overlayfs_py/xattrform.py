"""Which overlay xattrs a mount writes: ``trusted.overlay.*`` or ``user.overlay.*``.

Only a process with CAP_SYS_ADMIN in the initial user namespace may write ``trusted.*``
xattrs: not a plain user, not root of a user namespace (rootless podman runs its mount
program there, without ``userxattr``). Such a mount writes the ``user.overlay.*`` forms,
as the kernel overlay does with ``-o userxattr`` (and fuse-overlayfs by itself). It is
decided once, at mount time, by setting and removing a ``trusted.overlay.*`` xattr on a
file staged in the workdir -- not by failing the first opaque mkdir with EPERM.

With the user forms come the kernel's rules for ``userxattr`` (fs/overlayfs/params.c):
no redirect_dir beyond nofollow, no metacopy. Their defaults fall back quietly; asking
for them explicitly is an error, as with an explicit ``userxattr``.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os

from .config import Config, ConfigError

log = logging.getLogger("overlayfs_py")

PROBE_XATTR = "trusted.overlay.probe"


def trusted_writable(work_fd: int) -> bool:
    """True unless setting a trusted.* xattr on a new file in ``work_fd`` is refused."""
    name = "#xattr-probe.%d" % os.getpid()
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                 dir_fd=work_fd)
    try:
        os.setxattr(fd, PROBE_XATTR, b"y")
        os.removexattr(fd, PROBE_XATTR)
        return True
    except OSError as e:
        if e.errno == errno.EPERM:
            return False
        # ENOTSUP and the like: no xattrs there at all; the user forms would not help
        log.debug("xattr probe: %s", e)
        return True
    finally:
        os.close(fd)
        os.unlink(name, dir_fd=work_fd)


def choose(config: Config, work_fd: int) -> Config:
    """``config`` with ``userxattr`` set where trusted.* cannot be written on the upper
    layer (``work_fd``: the workdir's staging directory). Raises ConfigError for an
    explicit option that the user forms exclude. Logs the form in use, once."""
    if not config.userxattr and not trusted_writable(work_fd):
        if config.metacopy and "metacopy" in config.explicit:
            raise ConfigError("conflicting options: metacopy=on needs trusted.overlay.* "
                              "xattrs, which cannot be written on the upper layer here "
                              "(not root, or root of a user namespace)")
        if "redirect_dir" in config.explicit:
            raise ConfigError(f"conflicting options: redirect_dir={config.redirect_dir} "
                              "needs trusted.overlay.* xattrs, which cannot be written on "
                              "the upper layer here (not root, or root of a user namespace)")
        config = dataclasses.replace(config, userxattr=True, metacopy=False,
                                     redirect_dir="nofollow")
        log.info("trusted.* xattrs cannot be written on the upper layer: "
                 "using user.overlay.* (as with -o userxattr)")
    else:
        log.info("using %s.overlay.* xattrs", "user" if config.userxattr else "trusted")
    return config
