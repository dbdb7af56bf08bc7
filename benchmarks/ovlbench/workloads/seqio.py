"""Sequential read of the big lower file (cold, warm) and sequential write of a new one."""
import os
import random
import time

from ..common import MiB, Metric, drop_caches, human_bytes, read_file, same_blocks
from . import workload


@workload("read", order=70, rows=lambda s: [
    Metric(f"seq read {human_bytes(s.big_bytes)}, cold", "MB/s", True),
    Metric(f"seq read {human_bytes(s.big_bytes)}, warm", "MB/s", True)])
def read(b, t, rows):
    cold, warm = rows
    size = b.sizes.big_bytes
    with b.view(t, [b.fx.image]) as v:
        p = os.path.join(v.path, "big.bin")
        drop_caches()
        c = read_file(p, size)
        w = read_file(p, size)
        same_blocks(p, os.path.join(b.fx.image, "big.bin"), size)
    return {cold: size / c / 1e6, warm: size / w / 1e6}


@workload("write", order=80, rows=lambda s: [
    Metric(f"seq write {human_bytes(s.write_bytes)} + fsync", "MB/s", True)])
def write(b, t, rows):
    (name,) = rows
    size = b.sizes.write_bytes
    buf = bytes(random.Random(7).randbytes(MiB))
    with b.view(t, [b.fx.image], plain_copy=lambda p: None) as v:
        p = os.path.join(v.path, "new.bin")
        os.sync()
        t0 = time.perf_counter()
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for _ in range(size // MiB):
                os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        dt = time.perf_counter() - t0
        if os.stat(p).st_size != size:
            raise RuntimeError(f"wrote {size} bytes, file has {os.stat(p).st_size}")
    return {name: size / dt / 1e6}
