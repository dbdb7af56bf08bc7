"""A podman build of a six-step Containerfile on a debootstrap base, with each target as
podman's overlay: the kernel driver, or fuse-overlayfs / overlayfs-py as `mount_program`.

Every step is a container on a fresh mount (the program is started once per step and once
per COPY), so the row weighs start-up as much as the file operations of the steps.
Storage, configuration and the base image come from tests/podman/podkit.py: a private
podman storage per cell (the base imported from the cached debootstrap tar before the
clock starts), removed afterwards. Only `podman build` is timed.

Set OVL_PODMAN_LOCK=/path/to/lockfile to hold an flock on it for each cell (podman runs
must not overlap with other podman users on a shared machine: cleanup removes the
/var/lib/containers directories podman 4.3 creates whatever its configuration says).
"""
import contextlib
import fcntl
import os
import shlex
import sys
import time

from ..common import REPO, Metric, NotApplicable
from . import workload

sys.path.insert(0, os.path.join(REPO, "tests", "podman"))
import podkit  # noqa: E402

BASE = "localhost/bench-base:latest"
STEPS = 6
CONTAINERFILE = f"""\
FROM {BASE}
RUN ls -lR /usr/lib > /tmp/ls.txt && wc -l < /tmp/ls.txt > /etc/bench-count && rm /tmp/ls.txt
COPY ctx/ /opt/ctx/
RUN cp -a /usr/share/doc /opt/doc && find /opt/doc -type f | wc -l > /opt/ndoc
RUN rm -rf /usr/share/man /usr/share/locale /usr/share/doc && chmod -R go-w /opt
RUN cd /usr/lib/x86_64-linux-gnu && find . -name 'lib[a-m]*.so*' -type f | sort | \\
    xargs cat | sha256sum | cut -c1-16 > /opt/libsum
RUN for i in $(seq 1 300); do echo $i > /opt/ctx/n$i; done && \\
    cat /etc/bench-count /opt/ndoc /opt/libsum > /opt/summary && ls /opt/ctx | wc -l >> /opt/summary
"""

def _program(b, t):
    """The MountProgram for target t (None: the kernel overlay)."""
    if t.kind == "kernel":
        return podkit.MountProgram(None, None, "overlay", ())
    if t.name == "fuse-overlayfs":
        path = podkit._which("fuse-overlayfs")
        return podkit.MountProgram(path, path, "fuse.fuse-overlayfs", ("fuse-overlayfs",))
    script = os.path.join(REPO, ".venv", "bin", "overlayfs-py")
    if t.cmd[1:] == ["-m", "overlayfs_py"] and os.path.dirname(t.cmd[0]) == \
            os.path.dirname(script) and os.access(script, os.X_OK):
        path = script                  # the default: the installed command, as a user has it
    else:                              # --ours-cmd: podman needs one executable
        path = os.path.join(b.scratch(), "mount-program")
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\nexec {shlex.join(t.cmd)} \"$@\"\n")
        os.chmod(path, 0o755)
    return podkit.MountProgram(path, path, "fuse.overlayfs-py", ("overlayfs_py", "overlayfs-py"))


@contextlib.contextmanager
def _podman_lock():
    path = os.environ.get("OVL_PODMAN_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@workload("podman", order=180, drop_retry=False, rows=lambda s: [
    Metric(f"podman build, {STEPS} steps (mount_program)", "s")])
def podman(b, t, rows):
    (name,) = rows
    if t.kind == "plain":
        raise NotApplicable("no overlay: podman needs a storage driver")
    try:
        podkit.ensure_tools()
        rootfs = podkit.ensure_rootfs()
    except podkit.Unavailable as e:
        raise NotApplicable(str(e))
    prog = _program(b, t)
    d = b.scratch()
    ctx = os.path.join(d, "build")
    os.makedirs(os.path.join(ctx, "ctx", "sub"))
    for i in range(200):
        with open(os.path.join(ctx, "ctx", "sub" if i % 2 else "", f"c{i:03d}"), "w") as f:
            f.write(f"context file {i}\n" * (i % 17 + 1))
    with open(os.path.join(ctx, "Containerfile"), "w") as f:
        f.write(CONTAINERFILE)
    with _podman_lock():
        p = podkit.Podman(os.path.join(d, "podman"), prog)
        problems = []
        try:
            p("import", "-q", str(rootfs.tar), BASE, timeout=600)
            t0 = time.perf_counter()
            p("build", "--no-cache", "--network", "none", "-q", "-t", "bench-img",
              "-f", os.path.join(ctx, "Containerfile"), ctx, timeout=1800)
            dt = time.perf_counter() - t0
            out = p.sh("bench-img", "cat /opt/summary; "
                       "awk '$2 == \"/\" {print \"fstype\", $3}' /proc/mounts").split()
            summary, fstype = out[:4], out[-1]
            b.check("podman build: /opt/summary", t.name, " ".join(summary))
            if len(out) != 6 or summary[3] != "401":
                raise RuntimeError(f"unexpected /opt/summary in the built image: {out}")
            if fstype != prog.fstype:
                raise RuntimeError(f"the container's root is {fstype}, not {prog.fstype}")
        finally:
            problems = p.cleanup()
    b.remove(d)
    if problems:
        b.notes.append(f"podman {t.name}: cleanup had to force: " + "; ".join(problems)[:500])
    return {name: dt}

