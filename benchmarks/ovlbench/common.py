"""Small helpers every part of the harness uses: units, logging, cache drops, file reads,
the Metric (one row of the table) and how values and ratios are printed."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # benchmarks/
REPO = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")

FIXED_MTIME = 1577836800          # 2020-01-01T00:00:00Z, every fixture file and directory
MiB = 1 << 20
GiB = 1 << 30


class MountError(Exception):
    pass


class NotApplicable(Exception):
    """Raised by a workload for a target that cannot run it; the cell shows n/a[k] with
    the message as footnote."""


def human_bytes(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB:
        return f"{n // MiB} MiB"
    return f"{n} B"


def kfmt(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------- page-cache drops

OWN_DROPS = [0]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    OWN_DROPS[0] += 1


def vmstat_drops() -> int:
    """drop_pagecache + drop_slab from /proc/vmstat: bumped by every write to drop_caches."""
    n = 0
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith(("drop_pagecache ", "drop_slab ")):
                n += int(line.split()[1])
    return n


class DropWatch:
    """Counts drop_caches writes by other processes since creation. Test suites on the same
    machine do that; a drop in the middle of a warm measurement turns it into a cold one
    (seen: fuse-overlayfs "warm" stat at 500 layers, 205 s instead of 0.07 s)."""

    def __init__(self):
        self.v0, self.o0 = vmstat_drops(), OWN_DROPS[0]

    def foreign(self) -> int:
        return (vmstat_drops() - self.v0) - 2 * (OWN_DROPS[0] - self.o0)


DROP_RETRIES = 2


# -------------------------------------------------------------------- file and process helpers

def set_tree_mtimes(root: str) -> None:
    """Fixed mtimes everywhere, so fixtures are identical across builds (and git is not racy)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME),
                     follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


def count_entries(root: str) -> int:
    n = 1
    for _dirpath, dirnames, filenames in os.walk(root):
        n += len(dirnames) + len(filenames)
    return n


def git_env(cache_root: str) -> dict:
    home = os.path.join(cache_root, "home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ)
    env.update({"HOME": home, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z",
                "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z", "LC_ALL": "C"})
    env.pop("GIT_INDEX_FILE", None)
    env.pop("GIT_DIR", None)
    return env


def vmrss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def same_blocks(path: str, ref: str, size: int) -> None:
    """The first, a middle and the last MiB read through the mount equal the lower file's."""
    with open(path, "rb") as a, open(ref, "rb") as b:
        for off in (0, (size // 2) & ~(MiB - 1), size - MiB):
            if os.pread(a.fileno(), MiB, off) != os.pread(b.fileno(), MiB, off):
                raise RuntimeError(f"data read through the mount differs at offset {off}")


def read_file(path: str, size: int) -> float:
    buf = bytearray(MiB)
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    dt = time.perf_counter() - t0
    if n != size:
        raise RuntimeError(f"read {n} bytes from {path}, want {size}")
    return dt


# -------------------------------------------------------------------- rows and their format

@dataclass(frozen=True)
class Metric:
    """One row of the table. vs_1layer: the name of another row; each cell is also compared
    with the same target's value there (the stat rows: each depth against 1 layer, `N× 1L`)."""
    name: str
    unit: str                  # s | MB/s | files/s | MiB
    higher_better: bool = False
    vs_1layer: Optional[str] = None


def fmt_value(v: float, unit: str) -> str:
    if unit == "s":
        if v < 0.001:
            return f"{v * 1e6:.0f} µs"
        if v < 1:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"
    if unit == "MB/s":
        return f"{v:.0f} MB/s" if v >= 100 else f"{v:.3g} MB/s"
    if unit == "files/s":
        return f"{v / 1000:.3g}k/s" if v >= 1000 else f"{v:.3g}/s"
    if unit == "MiB":
        return f"{v:.3g} MiB"
    return f"{v:.3g} {unit}"


def slowdown(v: float, ref: float, higher_better: bool) -> Optional[float]:
    """How many times worse than ref (1.0 = the same, 2.0 = twice as slow / half the rate)."""
    try:
        return ref / v if higher_better else v / ref
    except ZeroDivisionError:
        return None


def fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "?"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    return f"{r:.2f}×"
