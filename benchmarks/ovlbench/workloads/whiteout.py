"""Unlink lower files spread over the tree: each leaves a whiteout."""
import os
import shutil
import time

from ..common import Metric, kfmt
from . import workload


@workload("whiteout", order=120, rows=lambda s: [
    Metric(f"delete {kfmt(s.delete_n)} lower files (whiteouts)", "files/s", True)])
def whiteout(b, t, rows):
    (name,) = rows
    rel = b.fx.delete_list()

    def copy(p):
        for r in rel:
            dst = os.path.join(p, r)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(b.fx.image, r), dst)

    with b.view(t, [b.fx.image], plain_copy=copy) as v:
        paths = [os.path.join(v.path, r) for r in rel]
        for p in paths:          # warm the lookups: time the deletions, not the lookups
            os.lstat(p)
        t0 = time.perf_counter()
        for p in paths:
            os.unlink(p)
        dt = time.perf_counter() - t0
        if any(os.path.lexists(p) for p in paths[::97]):
            raise RuntimeError("deleted lower files still visible")
    return {name: len(paths) / dt}
