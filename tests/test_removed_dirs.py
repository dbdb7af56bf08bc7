"""A directory that is open while rename(2) replaces it, or rmdir(2) removes it, lives on
for its descriptor: fstat succeeds with st_nlink 0, and fchmod, fchown, futimens and the
f*xattr calls work on it, as on a local filesystem. Differential against the kernel
overlay, which agrees on everything but the link count of a removed merged directory (it
keeps its "merged directories have one link" rule: 1). A removed directory that only a
lower layer had is not compared: on the kernel overlay every change to it fails with
ENOTDIR after rmdir, and after a rename over it the change lands on the directory that
replaced it (README, known divergences).
"""
from __future__ import annotations

import os
import stat

import pytest

import writekit as wk
from layerkit import DIR
from pairkit import pair  # noqa: F401  (fixture)

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

KINDS = ["upper", "merged", "lower"]


def spec():
    s = {}
    for how in ("rename", "rmdir"):
        s[f"merged_{how}/"] = DIR
        s[f"merged_{how}/gone"] = "x"
        s[f"lower_{how}/"] = DIR
    return s


def kernel_twin(p, how):
    """The kernel's side gets no "lower" case: make its view match ours without it."""
    root = p.k()
    if how == "rename":
        os.mkdir(os.path.join(root, "src_lower"))
        os.rename(os.path.join(root, "src_lower"), os.path.join(root, "lower_rename"))
    else:
        os.rmdir(os.path.join(root, "lower_rmdir"))


def prepare(root, kind, how):
    """Make <kind>_<how> an empty directory of that kind; open it; return the fd."""
    d = os.path.join(root, f"{kind}_{how}")
    if kind == "upper":
        os.mkdir(d)
    elif kind == "merged":
        os.mkdir(os.path.join(d, "made"))       # copies it up: upper + lower
        os.rmdir(os.path.join(d, "made"))
        os.unlink(os.path.join(d, "gone"))
    if how == "rename":
        os.mkdir(os.path.join(root, f"src_{kind}"))
    return os.open(d, os.O_RDONLY | os.O_DIRECTORY)


def remove(root, kind, how):
    d = os.path.join(root, f"{kind}_{how}")
    if how == "rename":
        os.rename(os.path.join(root, f"src_{kind}"), d)
    else:
        os.rmdir(d)


def probe(fd):
    """What the fd of the removed directory answers, in order."""
    out = {}

    def t(what, fn):
        out[what] = wk.attempt(fn)
    t("fstat", lambda: stat.S_IFMT(os.fstat(fd).st_mode))
    t("fchmod", lambda: os.fchmod(fd, 0o710))
    t("fchown", lambda: os.fchown(fd, 1000, 1001))
    t("futimens", lambda: os.utime(fd, ns=(1_000_000_000, 2_000_000_000)))
    t("fsetxattr", lambda: os.setxattr(fd, "user.x", b"1"))
    t("fgetxattr", lambda: os.getxattr(fd, "user.x"))
    t("flistxattr", lambda: sorted(os.listxattr(fd)))
    t("after", lambda: (oct(os.fstat(fd).st_mode), os.fstat(fd).st_uid,
                        os.fstat(fd).st_gid, os.fstat(fd).st_mtime_ns))
    t("fremovexattr", lambda: os.removexattr(fd, "user.x"))
    t("listdir", lambda: os.listdir(fd))
    t("fsync", lambda: os.fsync(fd))
    t("create inside", lambda: os.close(os.open("new", os.O_CREAT | os.O_WRONLY, 0o644,
                                                dir_fd=fd)))
    return out


@pytest.mark.parametrize("how", ["rename", "rmdir"])
def test_fd_of_a_removed_directory(pair, how):
    p = pair(spec())
    results = {}
    for side, root in (("ours", p.o()), ("kernel", p.k())):
        for kind in KINDS:
            if side == "kernel" and kind == "lower":
                continue
            fd = prepare(root, kind, how)
            try:
                before = os.fstat(fd)
                remove(root, kind, how)
                nlink = os.fstat(fd).st_nlink
                assert os.fstat(fd).st_ino == before.st_ino
                results[side, kind] = (nlink, probe(fd))
                nlink_end = os.fstat(fd).st_nlink
            finally:
                os.close(fd)
            results[side, kind] += (nlink_end,)
    kernel_twin(p, how)
    for kind in KINDS:
        nlink, got, nlink_end = results["ours", kind]
        assert (nlink, nlink_end) == (0, 0), f"{kind}: st_nlink {nlink} / {nlink_end}"
        assert all(r[0] == "ok" for w, r in got.items() if w != "create inside"), \
            f"{kind}: {got}"
        assert got["after"][1] == ("0o40710", 1000, 1001, 2_000_000_000), kind
        assert got["create inside"] == ("err", "ENOENT"), kind
        if kind == "lower":
            continue
        knlink, kgot, _ = results["kernel", kind]
        if kind == "upper":
            assert knlink == 0
        assert got == kgot, f"{kind}: kernel -> {kgot}\nours -> {got}"
    p.check()
    p.remount()
    p.check()
    assert os.listdir(os.path.join(p.stack.work, "work")) == []
