"""Mount time of the deepest mount stack: exec to live, first (cold caches) and again."""
import os
import time

from ..common import Metric, NotApplicable, drop_caches
from ..targets import cleanup_active_under
from . import workload


@workload("mount", order=10, rows=lambda s: [
    Metric(f"mount {s.mount_depth}-layer stack, first (cold)", "s"),
    Metric(f"mount {s.mount_depth}-layer stack, remount", "s")])
def mount(b, t, rows):
    if t.kind == "plain":
        raise NotApplicable("plain directory: nothing to mount")
    first, again = rows
    lowers = b.fx.stack_lowers(b.sizes.mount_depth)
    d = b.scratch()
    u, w, m = (os.path.join(d, x) for x in ("u", "w", "m"))
    for x in (u, w, m):
        os.mkdir(x)
    out = {}
    try:
        drop_caches()
        t0 = time.perf_counter()
        h = b.mount(t, lowers, u, w, m)
        out[first] = time.perf_counter() - t0
        os.stat(os.path.join(m, "usr/lib/d00/f000"))
        b.finish(t, h)
        t0 = time.perf_counter()
        h = b.mount(t, lowers, u, w, m)
        out[again] = time.perf_counter() - t0
        os.stat(os.path.join(m, "usr/lib/d00/f000"))
        b.finish(t, h)
    finally:
        cleanup_active_under(m)
        b.remove(d)
    return out
