"""The daemon's resident memory right after the mount and after a walk of the image."""
from ..common import Metric, NotApplicable, kfmt, vmrss_mib
from . import workload


@workload("rss", order=60, rows=lambda s: [
    Metric("daemon RSS after mount", "MiB"),
    Metric(f"daemon RSS after walking {kfmt(s.tree_files)} files", "MiB")])
def rss(b, t, rows):
    if t.kind != "fuse":
        raise NotApplicable("no daemon" if t.kind == "kernel" else "no mount")
    idle, walked = rows
    with b.view(t, [b.fx.image]) as v:
        r0 = vmrss_mib(v.pid)
        b.timed_cmd(["du", "-s", v.path])
        r1 = vmrss_mib(v.pid)
    return {idle: r0, walked: r1}
