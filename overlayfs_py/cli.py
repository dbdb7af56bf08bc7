"""The overlayfs-py command: argv -> Config, logging, daemonizing, exit codes.

Exit status: 0 once the mount is live (daemon mode) or after a clean unmount
(foreground); 1 with a single "overlayfs-py: <reason>" line on stderr for any bad
input or failed mount.

Daemon mode (no -f/-d) works like fuse-overlayfs: the process forks before trio or
pyfuse3 are imported; the parent waits on a pipe and exits 0 only after the child
reports that the mount is live, otherwise it prints the child's error line and exits
1. The child starts a new session, chdirs to "/" (every path in Config is absolute),
and detaches its stdio once the mount is live, so that errors before that point still
reach the user.

Start-up is most of a container's mount: the child imports trio only after the mount
is live (lazyimport), while the caller already goes on; every check and the mount
itself come before (README, "Start-up").
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional, Sequence

from .config import PROG, Config, ConfigError, InfoRequest, parse_argv

log = logging.getLogger("overlayfs_py.cli")

_READY = b"ready\n"
_ERR = b"error "


def _err(msg: str) -> None:
    # One line, always: a reason that contains newlines is flattened.
    line = " ".join(str(msg).split("\n")).strip() or "unknown error"
    try:
        sys.stderr.write(f"{PROG}: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def setup_logging(debug: bool) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"{PROG}[%(process)d] %(levelname).1s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


def _load_run():
    """Import the mount machinery lazily (it pulls in trio and pyfuse3). trio itself is
    deferred until the mount is live (lazyimport): nothing before the mount needs it."""
    from . import lazyimport
    for name in lazyimport.DAEMON_DEFERRED:
        lazyimport.defer(name)
    from .session import MountError, run  # noqa: WPS433 (lazy on purpose: after fork)
    return run, MountError


# The image commands (overlayfs_py/image/cmdline.py). The mount(8) form may name a SOURCE
# that happens to be one of these words; it always has -o lowerdir=..., they never do.
IMAGE_COMMANDS = ("image", "diff", "commit")


def _option_values(args: Sequence[str]) -> List[str]:
    out = []
    for i, a in enumerate(args):
        if a in ("-o", "--options") and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith("--options="):
            out.append(a[len("--options="):])
        elif a.startswith("-o") and a != "-o":
            out.append(a[2:])
    return out


def is_image_command(args: Sequence[str]) -> bool:
    return bool(args) and args[0] in IMAGE_COMMANDS and \
        not any("lowerdir=" in o for o in _option_values(args))


def _mount_image_plan(plan, mountpoint: str, upper: Optional[str], work: Optional[str],
                      options: Sequence[str], foreground: bool, debug: bool) -> int:
    """Mount an image's MountPlan with the plain mount command line (same daemon path, same
    -o options); the plan's layer leases are inherited by the daemon."""
    from .api import option_string
    argv: List[str] = ["-d"] if debug else (["-f"] if foreground else [])
    argv += ["-o", option_string(plan.lowers, upper, work, plan.options)]
    for o in options:
        argv += ["-o", o]
    argv.append(mountpoint)
    return main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    if is_image_command(args):
        from .image.cmdline import main as image_main
        return image_main(args, mount=_mount_image_plan)
    try:
        config = parse_argv(args)
    except InfoRequest as info:
        sys.stdout.write(info.text if info.text.endswith("\n") else info.text + "\n")
        sys.stdout.flush()
        return 0
    except ConfigError as e:
        _err(str(e))
        return 1

    setup_logging(config.debug)
    log.debug("config: %s", config)
    if config.foreground:
        return _run_foreground(config)
    return _daemonize(config)


def _dump_stats() -> None:
    """Request statistics, if OVERLAYFS_PY_STATS asked for them (stats.py)."""
    from . import stats
    stats.dump()


def _mount_failed_message(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _run_foreground(config: Config) -> int:
    try:
        run, MountError = _load_run()
    except ImportError as e:
        _err(f"cannot load the FUSE backend: {e}")
        return 1
    try:
        run(config, lambda: log.info("mounted %s", config.mountpoint))
        _dump_stats()
    except MountError as e:
        _err(_mount_failed_message(e))
        return 1
    except ConfigError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 1
    except Exception as e:        # a bug: show the traceback in debug mode only
        if config.debug:
            raise
        _err(f"internal error: {type(e).__name__}: {e} (run with -d for details)")
        return 1
    return 0


def _daemonize(config: Config) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        return _parent_wait(pid, rfd)
    # ---- child ----
    os.close(rfd)
    code = 1
    try:
        code = _child(config, wfd)
    except BaseException:             # never return into the caller's stack after fork
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os._exit(code)


def _parent_wait(pid: int, rfd: int) -> int:
    chunks = []
    try:
        while True:
            try:
                b = os.read(rfd, 4096)
            except InterruptedError:
                continue
            if not b:
                break
            chunks.append(b)
            if b"\n" in b"".join(chunks):
                break
    except KeyboardInterrupt:
        _err("interrupted while waiting for the mount")
        os.close(rfd)
        return 1
    os.close(rfd)
    data = b"".join(chunks)
    if data.startswith(_READY):
        return 0
    # The child failed: reap it and report its reason.
    try:
        _, status = os.waitpid(pid, 0)
        how = (f"status {os.waitstatus_to_exitcode(status)}"
               if hasattr(os, "waitstatus_to_exitcode") else f"wait status {status}")
    except ChildProcessError:
        how = "unknown status"
    if data.startswith(_ERR):
        _err(data[len(_ERR):].decode("utf-8", "replace").strip())
    else:
        _err(f"the daemon exited before the mount was ready ({how})")
    return 1


def _detach_stdio() -> None:
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def _child(config: Config, wfd: int) -> int:
    state = {"ready": False}
    wfd_box: List[Optional[int]] = [wfd]

    def report(data: bytes) -> None:
        if wfd_box[0] is None:
            return
        try:
            os.write(wfd_box[0], data)
        except OSError:
            pass
        try:
            os.close(wfd_box[0])
        except OSError:
            pass
        wfd_box[0] = None

    def on_ready() -> None:
        if state["ready"]:
            return
        state["ready"] = True
        log.info("mounted %s", config.mountpoint)
        report(_READY)
        _detach_stdio()

    def fail(msg: str) -> int:
        if state["ready"]:
            log.error("%s", msg)
        else:
            report(_ERR + " ".join(msg.split("\n")).encode("utf-8", "replace") + b"\n")
        return 1

    os.setsid()
    os.chdir("/")
    try:
        run, MountError = _load_run()
    except ImportError as e:
        return fail(f"cannot load the FUSE backend: {e}")
    try:
        run(config, on_ready)
        _dump_stats()
    except MountError as e:
        return fail(_mount_failed_message(e))
    except ConfigError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted")
    except Exception as e:            # a bug; rerun with -d (foreground) for the traceback
        return fail(f"internal error: {type(e).__name__}: {e}")
    if not state["ready"]:
        return fail("the mount ended before it became ready")
    return 0


def run_main() -> None:
    """The command's entry point (console script and ``python -m``). It ends the process with
    os._exit once stdout and stderr are flushed: in daemon mode the parent's exit is when the
    caller sees the mount, and a normal interpreter shutdown (module teardown, garbage
    collection) would add ~10 ms to it for nothing. Everything the command opened is closed
    by then; the daemon is a separate process."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


__all__ = ["main", "run_main", "setup_logging"]
