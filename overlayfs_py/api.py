"""The Python API: mount a layer stack for the duration of a ``with`` block.

The daemon runs as a child process (``python -m overlayfs_py -f``), so a crash of the filesystem
never takes the caller down, and the caller can kill it to test crash safety.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from typing import Iterable, Optional, Sequence


def _escape(path: str) -> str:
    return os.fspath(path).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def option_string(lower: Sequence[str], upper: Optional[str] = None, work: Optional[str] = None,
                  options: Iterable[str] = ()) -> str:
    parts = ["lowerdir=" + ":".join(_escape(p) for p in lower)]
    if upper is not None:
        parts.append("upperdir=" + _escape(upper))
    if work is not None:
        parts.append("workdir=" + _escape(work))
    parts.extend(options)
    return ",".join(parts)


class Mount:
    def __init__(self, proc: subprocess.Popen, mountpoint: str):
        self.proc = proc
        self.pid = proc.pid
        self.mountpoint = mountpoint
        self.plan = None             # an image mount's MountPlan (image_mount)


@contextlib.contextmanager
def mount(lower: Sequence[str], mountpoint: str, upper: Optional[str] = None,
          work: Optional[str] = None, options: Iterable[str] = (), debug: bool = False,
          timeout: float = 20.0, pass_fds: Sequence[int] = ()):
    """Mount ``lower`` (top layer first) [+ ``upper``/``work``] on ``mountpoint``.
    ``pass_fds`` are kept open in the daemon (an image mount's layer leases)."""
    mountpoint = os.path.abspath(mountpoint)
    cmd = [sys.executable, "-m", "overlayfs_py", "-f"]
    if debug:
        cmd.append("-d")
    cmd += ["-o", option_string(lower, upper, work, options), mountpoint]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=tuple(pass_fds))
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                raise RuntimeError(f"overlayfs-py exited with {proc.returncode} before mounting")
            if time.monotonic() > deadline:
                raise RuntimeError("overlayfs-py did not mount in time")
            time.sleep(0.02)
        yield Mount(proc, mountpoint)
    finally:
        if proc.poll() is None:
            if subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        elif os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    if proc.returncode not in (0, None):
        raise RuntimeError(f"overlayfs-py exited with status {proc.returncode}")


@contextlib.contextmanager
def image_mount(source: str, mountpoint: str, upper: Optional[str] = None,
                work: Optional[str] = None, *, store=None, platform=None,
                options: Iterable[str] = (), oci_markers: bool = False, debug: bool = False,
                progress=None, timeout: float = 20.0):
    """Mount an image (``SOURCE[:TAG]``, ``SOURCE@DIGEST`` or a stored image's name) for the
    ``with`` block: its missing layers are unpacked into the store first, and the daemon
    holds leases on the layers it uses. Read-only without ``upper``/``work``."""
    from .image import prepare_mount
    with prepare_mount(source, store=store, platform=platform, oci_markers=oci_markers,
                       progress=progress) as plan:
        with mount(plan.lowers, mountpoint, upper, work,
                   options=tuple(plan.options) + tuple(options), debug=debug, timeout=timeout,
                   pass_fds=plan.lease_fds) as m:
            m.plan = plan
            yield m
