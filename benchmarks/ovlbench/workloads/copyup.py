"""Copy-up of the big lower file: the first append, and (on another mount) the first chmod."""
import os
import subprocess
import time
from typing import Optional

from ..common import Metric, human_bytes, read_file
from . import workload


def copy_up(b, t, lower_dir: str, base: Optional[str] = None):
    """(append seconds, chmod seconds); with base (another scratch root), the append only."""
    src = os.path.join(lower_dir, "big.bin")
    size = os.stat(src).st_size
    read_file(src, size)      # lower data in the page cache: measure the fs, not the disk

    def copy(p):
        subprocess.run(["cp", "--reflink=auto", "--preserve=all", src, p], check=True)

    with b.view(t, [lower_dir], plain_copy=copy, base=base) as v:
        p = os.path.join(v.path, "big.bin")
        t0 = time.perf_counter()
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
        append = time.perf_counter() - t0
        if os.stat(p).st_size != size + 1:
            raise RuntimeError(f"size after append {os.stat(p).st_size}, want {size + 1}")
    if base is not None:
        return append, None
    with b.view(t, [lower_dir], plain_copy=copy) as v:
        p = os.path.join(v.path, "big.bin")
        t0 = time.perf_counter()
        os.chmod(p, 0o600)
        chmod = time.perf_counter() - t0
        if os.stat(p).st_mode & 0o777 != 0o600:
            raise RuntimeError("chmod did not take")
    return append, chmod


@workload("copyup", order=90, rows=lambda s: [
    Metric(f"copy-up: append 1 B to {human_bytes(s.big_bytes)} lower file", "s"),
    Metric(f"copy-up: chmod {human_bytes(s.big_bytes)} lower file", "s")])
def copyup(b, t, rows):
    a_n, c_n = rows
    a, c = copy_up(b, t, b.fx.image)
    return {a_n: a, c_n: c}
