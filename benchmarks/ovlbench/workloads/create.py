"""Create small files in a merged lower directory, then unlink them."""
import os
import time

from ..common import Metric, kfmt
from . import workload


@workload("create", order=110, rows=lambda s: [
    Metric(f"create {kfmt(s.create_n)} small files", "s"),
    Metric(f"delete those {kfmt(s.create_n)} files", "s")])
def create(b, t, rows):
    c_n, d_n = rows
    n = b.sizes.create_n
    payload = b"z" * 512
    with b.view(t, [b.fx.image], plain_copy=lambda p: os.mkdir(os.path.join(p, "tree"))) as v:
        d = os.path.join(v.path, "tree")
        paths = [os.path.join(d, f"new-{i:05d}") for i in range(n)]
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        t0 = time.perf_counter()
        for p in paths:
            fd = os.open(p, flags, 0o644)
            os.write(fd, payload)
            os.close(fd)
        t1 = time.perf_counter()
        for p in paths:
            os.unlink(p)
        t2 = time.perf_counter()
        if any(os.path.lexists(p) for p in paths[::97]):
            raise RuntimeError("deleted files still visible")
    return {c_n: t1 - t0, d_n: t2 - t1}
