"""Targets (plain, kernel, fuse-overlayfs, overlayfs-py) and their mounts: how each is
mounted and, whatever happens, unmounted."""
from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

from .common import MountError, NotApplicable, log

TARGET_ORDER = ("plain", "kernel", "fuse-overlayfs", "overlayfs-py")


@dataclass
class Target:
    name: str
    kind: str                    # plain | kernel | fuse
    cmd: Optional[List[str]] = None
    env: Optional[dict] = None
    disabled: Optional[str] = None
    mounted_ok: int = 0
    mount_failures: int = 0


ACTIVE: set = set()               # live mounts, for the atexit safety net


class Mounted:
    def __init__(self, target: Target, mnt: str, proc: Optional[subprocess.Popen] = None,
                 logpath: Optional[str] = None):
        self.target = target
        self.mnt = mnt
        self.proc = proc
        self.logpath = logpath
        self.exit_status: Optional[int] = None
        self.done = False
        ACTIVE.add(self)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def log_tail(self, n: int = 400) -> str:
        if not self.logpath:
            return ""
        try:
            with open(self.logpath, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        return data[-n:].decode(errors="replace").strip()

    def unmount(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            if self.proc is not None:
                r = subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
                if r.returncode != 0 and self.proc.poll() is None:
                    subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
                    self.proc.terminate()          # only our own daemon, by pid
                    try:
                        self.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
                self.exit_status = self.proc.returncode
                if mount_listed(self.mnt):         # daemon gone but mount left behind
                    subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
            else:
                r = subprocess.run(["umount", self.mnt], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        finally:
            ACTIVE.discard(self)


def cleanup_active() -> None:
    for m in list(ACTIVE):
        with contextlib.suppress(Exception):
            m.unmount()


def mount(target: Target, lowers: List[str], upper: str, work: str, mnt: str,
          timeout: float = 180.0, options: tuple = ()) -> Mounted:
    """options: extra mount options appended to lowerdir=,upperdir=,workdir= (metacopy=on)."""
    extra = "".join("," + o for o in options)
    if target.kind == "fuse":
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}{extra}"
        logpath = os.path.join(os.path.dirname(mnt), "daemon.log")
        with open(logpath, "wb") as logf:
            proc = subprocess.Popen([*target.cmd, "-f", "-o", opts, mnt], stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT, env=target.env,
                                    start_new_session=True)
        h = Mounted(target, mnt, proc, logpath)
        deadline = time.monotonic() + timeout
        try:
            # poll /proc/self/mountinfo, not os.path.ismount(): a stat of a FUSE mount whose
            # daemon never answers INIT blocks uninterruptibly, and the bench would hang
            while not mount_listed(mnt):
                rc = proc.poll()
                if rc is not None:
                    raise MountError(f"daemon exited with status {rc} before the mount was live: "
                                     f"{h.log_tail() or '(no output)'}")
                if time.monotonic() > deadline:
                    raise MountError(f"not mounted after {timeout:.0f} s: {h.log_tail()}")
                time.sleep(0.002)
            # then the first request, from a helper thread: if the daemon never answers, kill
            # it (our own pid), which aborts the connection and frees the waiting thread
            ok, err = stat_with_timeout(mnt, max(1.0, deadline - time.monotonic()))
            if not ok:
                stack = kernel_stack(proc.pid)
                proc.kill()
                raise MountError(f"mounted, but the daemon did not answer a stat of the mount "
                                 f"point within {timeout:.0f} s (daemon killed; its kernel "
                                 f"stack: {stack}); log: {h.log_tail() or '(no output)'}")
            if err:
                raise MountError(f"stat of the fresh mount failed: {err}; log: {h.log_tail()}")
        except BaseException:
            h.unmount()
            raise
        return h
    if target.kind == "kernel":
        # the option string must fit in a page: use names relative to the layers' common
        # parent (mount(2) resolves them against our cwd, as Docker does)
        parents = {os.path.dirname(p) for p in lowers}
        cwd = None
        names = lowers
        if len(parents) == 1:
            cwd = parents.pop()
            names = [os.path.basename(p) for p in lowers]
        opts = f"lowerdir={':'.join(names)},upperdir={upper},workdir={work}{extra}"
        if len(opts) >= 4096:
            raise MountError(f"overlay option string is {len(opts)} bytes, more than a page")
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], cwd=cwd,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise MountError(f"mount -t overlay failed ({len(lowers)} lowers, options "
                             f"{len(opts)} bytes): {r.stderr.strip()}")
        return Mounted(target, mnt)
    raise NotApplicable("plain directory: nothing to mount")


def mount_listed(mnt: str) -> Optional[str]:
    """The mount's major:minor if mnt is a mount point (read from mountinfo, without a stat)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4].encode().decode("unicode_escape") == mnt:
                return parts[2]
    return None


def stat_with_timeout(path: str, timeout: float):
    done = threading.Event()
    err: List[str] = []

    def probe():
        try:
            os.stat(path)
        except OSError as e:
            err.append(str(e))
        finally:
            done.set()
    threading.Thread(target=probe, daemon=True).start()
    return done.wait(timeout), (err[0] if err else None)


def kernel_stack(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stack") as f:
            frames = [ln.split("]", 1)[-1].strip().split("+")[0] for ln in f]
        return " < ".join(frames[:4])
    except OSError:
        return "?"


@dataclass
class View:
    path: str                     # where the workload operates
    pid: Optional[int] = None     # daemon pid (FUSE targets)
    base: str = ""                # the per-run scratch directory


def cleanup_stale(cache: str) -> None:
    """Unmount anything a previous, killed run left mounted under our cache directory."""
    cache = os.path.realpath(cache)
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    stale = []
    for line in lines:
        parts = line.split()
        mnt = parts[4].encode().decode("unicode_escape")
        fstype = parts[parts.index("-") + 1]
        if mnt == cache or mnt.startswith(cache + "/"):
            stale.append((mnt, fstype))
    for mnt, fstype in sorted(stale, key=lambda x: -len(x[0])):
        log(f"unmounting stale {fstype} mount {mnt}")
        if fstype.startswith("fuse"):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        else:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    for img in (os.path.join(cache, m, "xfs.img") for m in ("quick", "full")):
        if os.path.exists(img):
            r = subprocess.run(["losetup", "-j", img], capture_output=True, text=True)
            for line in r.stdout.splitlines():
                dev = line.split(":", 1)[0]
                log(f"detaching stale loop device {dev}")
                subprocess.run(["losetup", "-d", dev], capture_output=True)



def cleanup_active_under(mnt: str) -> None:
    for m in list(ACTIVE):
        if m.mnt == mnt:
            m.unmount()
