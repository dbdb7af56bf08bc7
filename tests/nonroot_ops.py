"""The write operations of the non-root differential test, run on a merged view by the
non-root user (``python nonroot_ops.py MNT``; test_nonroot.py runs it on our mount and
on the kernel overlay). Prints one JSON object: each step's outcome (value or errno
name), then the merged view's snapshot. The layers are ``nonroot_ops.LOWER`` plus
``secret``, a 0600 file of another owner, ``pub``, a 0644 one,
and ``pubdir``, a 0777 directory of another owner (added by root)."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import layerkit  # noqa: E402
import writekit as wk  # noqa: E402

LOWER = {
    "d/a": "a\n", "d/sub/b": "b\n", "e/": layerkit.DIR, "f": "f\n", "g": "g\n", "h": "h\n",
    "x": "x\n", "l1": "l\n", "r1": "r\n", "dir1/c": "c\n", "t": "0123456789\n",
}


def steps(m):
    p = lambda rel: os.path.join(m, rel)   # noqa: E731

    def rm_r_mkdir():                      # the bug: opaque dir over a lower dir
        for root, dirs, files in os.walk(p("d"), topdown=False):
            for n in files:
                os.unlink(os.path.join(root, n))
            for n in dirs:
                os.rmdir(os.path.join(root, n))
        os.rmdir(p("d"))
        os.mkdir(p("d"), 0o755)
        wk.write_file(p("d/new"), b"new\n")
        return sorted(os.listdir(p("d")))

    def append(rel, data):
        with open(p(rel), "ab") as f:
            f.write(data)

    def read(rel):
        with open(p(rel), "rb") as f:
            return f.read().decode()

    def open_wr(rel):
        os.close(os.open(p(rel), os.O_WRONLY))

    yield "rm -r d; mkdir d", rm_r_mkdir
    yield "unlink f", lambda: os.unlink(p("f"))
    yield "rmdir e", lambda: os.rmdir(p("e"))
    yield "append g", lambda: append("g", b"more\n")
    yield "chmod h", lambda: os.chmod(p("h"), 0o640)
    yield "chown h self", lambda: os.chown(p("h"), os.getuid(), os.getgid())
    yield "chown h other", lambda: os.chown(p("h"), os.getuid() + 1, -1)
    yield "utime h", lambda: os.utime(p("h"), (1000000000, 1000000000))
    yield "setxattr user x", lambda: os.setxattr(p("x"), "user.test", b"v")
    yield "getxattr user x", lambda: os.getxattr(p("x"), "user.test").decode()
    yield "setxattr trusted x", lambda: os.setxattr(p("x"), "trusted.test", b"v")
    # the overlay's own namespace, stored escaped (user.overlay.overlay.nested)
    yield "setxattr user.overlay g", lambda: os.setxattr(p("g"), "user.overlay.nested", b"n")
    yield "getxattr user.overlay g", lambda: os.getxattr(p("g"), "user.overlay.nested").decode()
    yield "listxattr g", lambda: sorted(os.listxattr(p("g")))
    yield "link l1 l2", lambda: os.link(p("l1"), p("l2"))
    yield "append l2", lambda: append("l2", b"via l2\n")
    yield "rename r1 r2", lambda: os.rename(p("r1"), p("r2"))
    yield "rename dir1", lambda: os.rename(p("dir1"), p("dir2"))
    yield "create n", lambda: wk.write_file(p("n"), b"n\n")
    yield "rename_whiteout n", lambda: wk.renameat2(p("n"), p("n2"), wk.RENAME_WHITEOUT)
    yield "rename_exchange t n", lambda: wk.renameat2(p("t"), p("n"), wk.RENAME_EXCHANGE)
    yield "truncate n", lambda: os.truncate(p("n"), 3)
    yield "mkfifo", lambda: os.mkfifo(p("fifo"), 0o644)
    yield "symlink", lambda: os.symlink("g", p("sym"))
    yield "mknod chr 1:3", lambda: os.mknod(p("null"), 0o666 | 0o020000, os.makedev(1, 3))
    yield "read secret", lambda: read("secret")
    yield "open_wr secret", lambda: open_wr("secret")
    yield "chmod secret", lambda: os.chmod(p("secret"), 0o644)
    yield "link secret", lambda: os.link(p("secret"), p("secret2"))
    yield "rename secret", lambda: os.rename(p("secret"), p("secret3"))
    yield "rename pub", lambda: os.rename(p("pub"), p("pub2"))
    yield "create in pubdir", lambda: wk.write_file(p("pubdir/new"), b"n\n")
    yield "unlink secret", lambda: os.unlink(p("secret"))
    yield "mkdir d2; rmdir", lambda: (os.mkdir(p("d2")), os.rmdir(p("d2")))


def _sha256_or_errno(path):
    try:
        return _file_sha256(path)
    except PermissionError:
        return "EACCES"


_file_sha256, layerkit.file_sha256 = layerkit.file_sha256, _sha256_or_errno


def main(m):
    out = {}
    for name, fn in steps(m):
        out[name] = wk.outcome(wk.attempt(fn))
    out["merged"] = layerkit.snapshot(m)
    json.dump(out, sys.stdout, sort_keys=True, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
