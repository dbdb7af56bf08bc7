"""Start-up as a container engine sees it: the mount program in daemon mode (no -f), timed
from exec until the command returns (the mount is live) and until a first stat of the
mount is answered (the daemon serves). Warm caches; 2 layers and the mount workload's deep
stack; the median of MOUNTS mounts per cell. `mount -t overlay` for the kernel.
"""
import os
import statistics
import subprocess
import time

from ..common import Metric, MountError, NotApplicable
from ..targets import Target, mount, mount_listed, stat_with_timeout
from . import workload

MOUNTS = 5


def _rows(s):
    out = []
    for depth in (2, s.mount_depth):
        out += [Metric(f"start-up {depth} layers: command returns (daemon mode)", "s"),
                Metric(f"start-up {depth} layers: first stat answered", "s")]
    return out


def _daemons(mnt: str):
    """pids of processes whose command line ends with the mount point (our daemons)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if len(argv) >= 2 and argv[-2] == os.fsencode(mnt):
                pids.append(int(entry))
    return pids


def _once(t: Target, lowers, d: str):
    u, w, m = (os.path.join(d, x) for x in ("u", "w", "m"))
    for x in (u, w, m):
        os.mkdir(x)
    if t.kind == "kernel":
        t0 = time.perf_counter()
        h = mount(t, lowers, u, w, m)
        t1 = time.perf_counter()
        os.stat(m)
        t2 = time.perf_counter()
        h.unmount()
        return t1 - t0, t2 - t0
    opts = f"lowerdir={':'.join(lowers)},upperdir={u},workdir={w}"
    t0 = time.perf_counter()
    r = subprocess.run([*t.cmd, "-o", opts, m], env=t.env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    t1 = time.perf_counter()
    try:
        if r.returncode != 0:
            raise MountError(f"{t.name} exited {r.returncode}: {r.stderr.strip()[-300:]}")
        if not mount_listed(m):
            raise MountError(f"{t.name} returned before the mount was live")
        ok, err = stat_with_timeout(m, 60)
        t2 = time.perf_counter()
        if not ok or err:
            raise MountError(f"first stat of the mount: {err or 'no answer in 60 s'}")
        return t1 - t0, t2 - t0
    finally:
        pids = _daemons(m)
        subprocess.run(["fusermount3", "-u", m], capture_output=True)
        if mount_listed(m):
            subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)
        deadline = time.monotonic() + 30
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
            time.sleep(0.01)


@workload("startup", order=15, drop_retry=False, rows=_rows)
def startup(b, t, rows):
    if t.kind == "plain":
        raise NotApplicable("plain directory: nothing to mount")
    out = {}
    for i, depth in enumerate((2, b.sizes.mount_depth)):
        lowers = b.fx.stack_lowers(depth)
        ret, first = [], []
        for _ in range(MOUNTS):
            d = b.scratch()
            try:
                a, c = _once(t, lowers, d)
            finally:
                b.remove(d)
            ret.append(a)
            first.append(c)
        out[rows[2 * i]] = statistics.median(ret)
        out[rows[2 * i + 1]] = statistics.median(first)
    return out
