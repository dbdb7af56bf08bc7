"""Random 4 KiB I/O with fio on a file made through the mount (so in the upper layer): libaio
at iodepth 32, buffered and O_DIRECT, reads and writes; and random reads through mmap.
These are the rows FUSE passthrough is for (the kernel does the I/O on the upper file)."""
import json
import os
import shutil
import subprocess

from ..common import MiB, Metric, NotApplicable, drop_caches, human_bytes
from . import workload

# (row suffix, fio arguments)
JOBS = [
    ("randread, buffered", ["--rw=randread", "--ioengine=libaio", "--iodepth=32", "--direct=0"]),
    ("randwrite, buffered", ["--rw=randwrite", "--ioengine=libaio", "--iodepth=32", "--direct=0"]),
    ("randread, O_DIRECT", ["--rw=randread", "--ioengine=libaio", "--iodepth=32", "--direct=1"]),
    ("randwrite, O_DIRECT", ["--rw=randwrite", "--ioengine=libaio", "--iodepth=32", "--direct=1"]),
    ("randread through mmap", ["--rw=randread", "--ioengine=mmap"]),
]


def _size(s) -> int:
    return 64 * MiB if s.mode == "quick" else 512 * MiB


def _runtime(s) -> int:
    return 3 if s.mode == "quick" else 10


@workload("fio", order=85, rows=lambda s: [
    Metric(f"fio 4 KiB {name}{', libaio qd32' if 'mmap' not in name else ''} "
           f"({human_bytes(_size(s))} file)", "MB/s", True) for name, _ in JOBS])
def fio(b, t, rows):
    """Each job on one file laid out through the mount first; caches dropped before each
    job, so buffered reads start cold and the page cache fills as they run."""
    if not shutil.which("fio"):
        raise NotApplicable("fio not installed (apt-get install fio)")
    size = _size(b.sizes)
    out = {}
    with b.view(t, [b.fx.image], plain_copy=lambda p: None) as v:
        path = os.path.join(v.path, "fio.dat")
        base = ["fio", "--name=bench", f"--filename={path}", f"--size={size}", "--bs=4k",
                "--randrepeat=1", "--norandommap", "--invalidate=0", "--time_based",
                f"--runtime={_runtime(b.sizes)}", "--output-format=json"]
        # lay the file out (real data, no holes) and get it to the disk
        subprocess.run(["fio", "--name=layout", f"--filename={path}", f"--size={size}",
                        "--bs=1M", "--rw=write", "--ioengine=psync", "--end_fsync=1",
                        "--output-format=json"], check=True, capture_output=True)
        for row, (_, args) in zip(rows, JOBS):
            drop_caches()
            r = subprocess.run(base + args, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"fio {args}: {r.stderr.strip()[-300:]}")
            job = json.loads(r.stdout)["jobs"][0]
            side = "write" if "write" in args[0] else "read"
            out[row] = job[side]["bw_bytes"] / 1e6
        b.check("fio file size", t.name, os.stat(path).st_size)
    return out
