"""Whole-tree walks of the image layer: find, du -s, tar -c; cold then warm."""
from ..common import Metric, drop_caches, kfmt
from . import workload


def _walk(b, t, rows, cmd, what):
    cold_n, warm_n = rows
    with b.view(t, [b.fx.image]) as v:
        drop_caches()
        c, out1 = b.timed_cmd([*cmd, v.path] if what != "tar" else cmd, cwd=v.path)
        w, out2 = b.timed_cmd([*cmd, v.path] if what != "tar" else cmd, cwd=v.path)
    if what == "find":
        b.check("find: entries listed", t.name, len(out1.splitlines()))
        b.check("find: entries listed", t.name, len(out2.splitlines()))
    elif what == "du":
        b.check("du -s: total KiB", t.name, out1.split()[0])
    elif what == "tar":
        b.check("tar -c tree: archive bytes", t.name, out1.strip())
        b.check("tar -c tree: archive bytes", t.name, out2.strip())
    return {cold_n: c, warm_n: w}


@workload("find", order=30, rows=lambda s: [
    Metric(f"find, {kfmt(s.tree_files)}-file image, cold", "s"),
    Metric(f"find, {kfmt(s.tree_files)}-file image, warm", "s")])
def find(b, t, rows):
    return _walk(b, t, rows, ["find"], "find")


@workload("du", order=40, rows=lambda s: [
    Metric(f"du -s, {kfmt(s.tree_files)}-file image, cold", "s"),
    Metric(f"du -s, {kfmt(s.tree_files)}-file image, warm", "s")])
def du(b, t, rows):
    return _walk(b, t, rows, ["du", "-s"], "du")


@workload("tar", order=50, rows=lambda s: [
    Metric(f"tar -c, {kfmt(s.tree_files)}-file tree, cold", "s"),
    Metric(f"tar -c, {kfmt(s.tree_files)}-file tree, warm", "s")])
def tar(b, t, rows):
    # to a pipe, not to /dev/null: GNU tar skips reading file data when the archive is
    # /dev/null, and we want the data read
    return _walk(b, t, rows, ["sh", "-c", "tar -cf - tree | wc -c"], "tar")
