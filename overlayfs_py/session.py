"""Mount, serve and unmount: pyfuse3.init options, trio.run(pyfuse3.main), signals, clean close.

``run(config, on_ready)`` blocks while the filesystem is mounted. It calls ``on_ready()`` once the
mount is live (the CLI's daemon uses it to let its parent exit 0), and raises MountError, with a
one-line reason, if the mount cannot be made; nothing is left mounted in that case.
"""
from __future__ import annotations

import ctypes
import grp
import logging
import os
import resource
import signal
import stat
from typing import Callable, Optional

import pyfuse3
import trio

from . import index, xattrform
from .config import Config, ConfigError, fuse_escape
from .copyup import Workdir
from .ops import Operations
from .overlay import Overlay

log = logging.getLogger("overlayfs_py")

MIN_TASKS, MAX_TASKS = 4, 64
WRITEBACK_TIMEOUT = 20.0     # seconds a signal waits for the kernel to write back its cache
SIGNAL_GRACE = 2.0           # ... and then for files still open through the detached mount
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)     # libc is loaded: no ldconfig run (find_library)
# Set once a signal has detached the mount: the mount point may then hold another mount
# (a new daemon started at once), which the final close must not unmount.
_detached = []


class MountError(Exception):
    """The mount could not be made; str() is the reason."""


def _raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fuse_options(config: Config) -> set:
    """pyfuse3.init options. As root, like `mount -t overlay` (and like fuse-overlayfs for
    allow_other and suid), device nodes and setuid bits work and every user may enter the
    mount -- container engines run their processes as other users -- unless the caller
    said nodev, nosuid or allow_root."""
    opts = {f"fsname={fuse_escape(config.fsname)}"}
    extra = set(config.extra_fuse_options)
    if os.geteuid() == 0:
        if "nodev" not in extra:
            opts.add("dev")
        if "nosuid" not in extra:
            opts.add("suid")
        if "allow_root" not in extra:
            opts.add("allow_other")
    if not any(o.startswith("subtype=") for o in config.extra_fuse_options):
        opts.add("subtype=overlayfs-py")
    if config.default_permissions:
        opts.add("default_permissions")
    if config.allow_other:
        opts.add("allow_other")
    if not config.writable:
        opts.add("ro")
    opts.update(config.extra_fuse_options)
    opts.discard("rw")
    return opts


def poll_spin_ns(config: Config) -> int:
    """How long an idle worker polls for the next request before it sleeps (pyfuse3 patch
    level 3). On this kind of VM most of a request's round trip is two wakeups of halted
    CPUs: the daemon's on the request, the client's on the reply. A client working through
    one request after another sends its next request within tens of microseconds, so a
    short spin saves the first wakeup. With one CPU the spin would only delay the client."""
    if len(os.sched_getaffinity(0)) < 2:
        return 0
    return config.spin_us * 1000


def _detach_and_write_back(mountpoint: str) -> None:
    """What a signal does before the loop ends: detach the mount (``umount -l``: no new
    path reaches it, files already open keep working), then syncfs(2) it, so that data the
    kernel still caches for files not yet closed or synced (the writeback cache) is written
    to the upper layer. If nothing else holds the mount, dropping our own reference makes
    the kernel shut it down -- writing back everything -- and end the session: the loop
    then returns by itself. Runs in a worker thread: all of this waits for requests that
    the loop must keep serving meanwhile."""
    try:
        fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        log.warning("unmount on signal: cannot open %s: %s", mountpoint, e)
        fd = None
    try:
        if os.geteuid() == 0:
            if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
                _detached.append(mountpoint)
            else:
                log.warning("unmount on signal: %s", os.strerror(ctypes.get_errno()))
        else:
            import subprocess        # only here: it costs every start otherwise
            r = subprocess.run(["fusermount3", "-u", "-z", mountpoint],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if r.returncode == 0:
                _detached.append(mountpoint)
        if fd is not None and _libc.syncfs(fd) != 0:
            log.warning("write-back on signal: %s", os.strerror(ctypes.get_errno()))
    finally:
        if fd is not None:
            os.close(fd)


async def _serve(ops: Operations) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ops.trim_nodes)
        async def on_signals():
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("signal %d: unmounting", signum)
                    with trio.move_on_after(WRITEBACK_TIMEOUT) as scope:
                        await trio.to_thread.run_sync(_detach_and_write_back,
                                                      ops.config.mountpoint,
                                                      abandon_on_cancel=True)
                    if scope.cancelled_caught:
                        log.warning("unmount on signal: no write-back after %.0f s",
                                    WRITEBACK_TIMEOUT)
                    # Files still open keep working for a moment (the loop returns as soon
                    # as the last one is closed); then the session ends for them too.
                    await trio.sleep(SIGNAL_GRACE)
                    pyfuse3.terminate()
                    return
        nursery.start_soon(on_signals)
        try:
            await pyfuse3.main(MIN_TASKS, MAX_TASKS)
        except* ConnectionAbortedError:
            # The kernel ended the connection with requests still queued: an unmount while
            # RELEASEs of many just-closed files were pending (seen with 20,000), or an
            # abort through fusectl. The mount is gone either way; nothing is left to serve.
            log.warning("the kernel aborted the FUSE connection; the mount is gone")
        nursery.cancel_scope.cancel()


FUSE_DEVICE = "/dev/fuse"


def check_fuse_device(path: str = FUSE_DEVICE) -> None:
    """Raise MountError with one line naming the fix if this process cannot open the FUSE
    device. libfuse opens it before anything else (also for a non-root user, who then
    mounts through fusermount3) and would only print its own line and fail."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except FileNotFoundError:
        raise MountError(f"no {path}: load the fuse module (modprobe fuse)") from None
    except PermissionError as e:
        try:
            st = os.stat(path)
            group = grp.getgrgid(st.st_gid).gr_name
            how = f"mode {stat.S_IMODE(st.st_mode):04o}, group {group}"
        except (OSError, KeyError):
            how, group = "unknown mode", "fuse"
        raise MountError(
            f"cannot open {path}: {e.strerror} ({how}): make it usable by this user "
            f"(chmod 0666 {path}, as desktop distributions ship it) or add the user to a "
            f"group that may open it (e.g. 'fuse': chgrp fuse {path}; chmod 0660 {path})") \
            from None


def run(config: Config, on_ready: Optional[Callable[[], None]] = None) -> None:
    os.umask(0)                      # modes come from the kernel, already masked
    check_fuse_device()
    _raise_nofile_limit()
    ov = work = None
    try:
        if config.writable:
            try:
                work = Workdir(config.work)
                config = xattrform.choose(config, work.fd)
            except OSError as e:
                raise MountError(f"cannot prepare workdir {config.work!r}: {e.strerror}") \
                    from None
            except ConfigError as e:
                raise MountError(str(e)) from None
        try:
            ov = Overlay(config)
        except OSError as e:
            raise MountError(f"cannot open layer {e.filename!r}: {e.strerror}") from None
        if config.writable:
            try:
                if config.index:
                    ov.xindex = index.setup(config, ov.layers, config.work)
                work.prepare(ov.xindex.fd if ov.xindex else None)
            except index.IndexError_ as e:
                raise MountError(f"index=on: {e}") from None
            except OSError as e:
                raise MountError(f"cannot prepare workdir {config.work!r}: {e.strerror}") \
                    from None
        ops = Operations(config, ov, work)
        if config.passthrough == "on" and ops.pt_off_reason is not None:
            raise MountError(f"passthrough=on, but {ops.pt_off_reason}")
        try:
            pyfuse3.init(ops, config.mountpoint, fuse_options(config))
        except (RuntimeError, OSError) as e:
            raise MountError(f"cannot mount on {config.mountpoint!r}: {e}") from None
        set_spin = getattr(pyfuse3, "set_poll_spin", None)    # a stock pyfuse3 has none
        if set_spin is not None:
            set_spin(poll_spin_ns(config))
        try:
            if on_ready is not None:
                if config.passthrough == "on":
                    ops.on_init = on_ready    # live once the kernel granted it at INIT
                else:
                    on_ready()
            trio.run(_serve, ops)
            if ops.init_error is not None:
                raise MountError(ops.init_error)
        finally:
            ops.handles.close_all()
            if ops.toucher is not None:
                ops.toucher.close()
            if ops.writable:
                ops.ns.close()
            pyfuse3.close(unmount=not _detached)
    finally:
        if ov is not None:
            ov.close()
        if work is not None:
            work.close()
