"""Targeted write-path cases: every mutating operation, its errno, and the on-disk upper
format it leaves behind (copy-up, whiteouts, opaque dirs, renames, links, xattrs, fsync).

The expectations are the kernel overlay's (redirect_dir=off, index=off): run with
``OVL_TEST_PROG=kernel`` to check that they hold there. The few places where we follow
fuse-overlayfs instead of the kernel (refusing ``.wh.*`` names) are marked ``fuse_only``.
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

import layerkit
import writekit as wk
from conftest import fuse_only
from layerkit import (DIR, FIFO, Dir, File, Symlink, OPAQUE_KERNEL, OPAQUE_OCI,
                      WHITEOUT_KERNEL, WHITEOUT_OCI)

pytestmark = pytest.mark.mount


class Ovl:
    """One mounted stack: .p(rel) in the merged view, .u(rel) in the upper dir."""

    def __init__(self, stack, m):
        self.stack = stack
        self.m = m
        self.mnt = Path(wk.mp(m))
        self.upper = wk.upper_of(stack, m)

    def p(self, rel=""):
        return self.mnt / rel if rel else self.mnt

    def u(self, rel=""):
        return self.upper / rel if rel else self.upper

    def upper_names(self):
        return wk.tree_paths(self.upper)

    def merged(self):
        return wk.merged_snapshot(self.mnt)


@pytest.fixture
def ovl(make_layers, mounted, tmp_path):
    def make(*lowers, upper=True, options=()):
        stack = make_layers(*lowers, upper=upper)
        return Ovl(stack, mounted(stack, options=options))

    with wk.watchdog(tmp_path, 120, "write-ops test"):
        yield make


def err(fn, *a, **kw):
    """errno name of fn(*a) (fails if it succeeds)."""
    r = wk.attempt(fn, *a, **kw)
    assert r[0] == "err", f"{fn.__name__}{a} succeeded, expected an error"
    return r[1]


def lower_snapshots(stack):
    return [layerkit.snapshot(d, times=True) for d in stack.lowers]


def is_whiteout(path):
    return os.path.lexists(path) and wk.is_whiteout(path)


BASE = {
    "f": "lower f\n",
    "g": File("lower g\n", mode=0o640, uid=1000, gid=1000, xattrs={"user.k": b"v"},
              mtime=1_000_000_000),
    "d/": DIR,
    "d/a": "a\n",
    "d/sub/b": "b\n",
    "e": Dir(mode=0o750, uid=1000, gid=100, xattrs={"user.dir": b"1"}, mtime=1_100_000_000),
    "e/e2": Dir(mode=0o700, mtime=1_200_000_000),
    "e/e2/deep": File("deep\n", mode=0o600, mtime=1_300_000_000),
    "empty/": DIR,
    "ln": Symlink("f"),
    "fifo": FIFO,
}


# ---------------------------------------------------------------------------------------------
# copy-up
# ---------------------------------------------------------------------------------------------

def test_read_only_open_never_copies_up(ovl):
    o = ovl(BASE)
    before = lower_snapshots(o.stack)
    for rel in ("f", "g", "d/a", "e/e2/deep"):
        with open(o.p(rel), "rb") as f:
            f.read()
        fd = os.open(o.p(rel), os.O_RDONLY | os.O_NOATIME)
        os.close(fd)
    os.listdir(o.p("d"))
    os.stat(o.p("e/e2/deep"))
    os.readlink(o.p("ln"))
    os.getxattr(o.p("g"), "user.k")
    assert o.upper_names() == []
    assert lower_snapshots(o.stack) == before


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND],
                         ids=["wronly", "rdwr", "append"])
def test_write_open_copies_up_full_content(ovl, flags):
    o = ovl(BASE)
    fd = os.open(o.p("e/e2/deep"), flags)
    os.close(fd)
    # the kernel copies up at open, even if nothing is written
    assert wk.read_file(o.u("e/e2/deep")) == b"deep\n"
    assert stat.S_IMODE(os.lstat(o.u("e/e2/deep")).st_mode) == 0o600
    assert o.upper_names() == ["e", "e/e2", "e/e2/deep"]


def test_o_trunc_copies_up_empty(ovl):
    o = ovl(BASE)
    fd = os.open(o.p("g"), os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    st = os.lstat(o.u("g"))
    assert st.st_size == 0 and stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert os.getxattr(o.u("g"), "user.k") == b"v"
    assert wk.read_file(o.p("g")) == b""
    assert wk.read_file(o.stack.lowers[0] / "g") == b"lower g\n"


def test_write_then_read_back_and_lower_untouched(ovl):
    o = ovl(BASE)
    before = lower_snapshots(o.stack)
    with open(o.p("f"), "r+b") as f:
        f.seek(0, 2)
        f.write(b"appended\n")
    assert wk.read_file(o.p("f")) == b"lower f\nappended\n"
    assert wk.read_file(o.u("f")) == b"lower f\nappended\n"
    assert lower_snapshots(o.stack) == before


def test_truncate_copies_up(ovl):
    o = ovl(BASE)
    os.truncate(o.p("d/a"), 1)
    assert wk.read_file(o.u("d/a")) == b"a"
    os.truncate(o.p("f"), 100)
    assert wk.read_file(o.p("f")) == b"lower f\n" + b"\0" * 92
    assert os.lstat(o.u("f")).st_size == 100


@pytest.mark.parametrize("op", ["chmod", "chown", "utime", "setxattr", "removexattr"])
def test_metadata_change_copies_up(ovl, op):
    o = ovl(BASE)
    p = o.p("g")
    if op == "chmod":
        os.chmod(p, 0o604)
    elif op == "chown":
        os.chown(p, 2000, 2001)
    elif op == "utime":
        os.utime(p, ns=(1_234_000_000_000_000_001, 1_333_000_000_000_000_002))
    elif op == "setxattr":
        os.setxattr(p, "user.new", b"n")
    elif op == "removexattr":
        os.removexattr(p, "user.k")
    st = os.lstat(o.u("g"))
    assert wk.read_file(o.u("g")) == b"lower g\n"
    assert stat.S_IMODE(st.st_mode) == (0o604 if op == "chmod" else 0o640)
    assert (st.st_uid, st.st_gid) == ((2000, 2001) if op == "chown" else (1000, 1000))
    if op == "utime":
        assert (st.st_atime_ns, st.st_mtime_ns) == (1_234_000_000_000_000_001,
                                                    1_333_000_000_000_000_002)
    else:
        assert st.st_mtime == 1_000_000_000          # copy-up keeps the lower mtime
    xattrs = {n: os.getxattr(o.u("g"), n) for n in os.listxattr(o.u("g")) if n.startswith("user.")}
    want = {"user.k": b"v"}
    if op == "setxattr":
        want["user.new"] = b"n"
    if op == "removexattr":
        want = {}
    assert xattrs == want
    # and the merged view agrees
    mst = os.lstat(p)
    assert (stat.S_IMODE(mst.st_mode), mst.st_uid, mst.st_gid, mst.st_mtime_ns) == \
        (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
    assert sorted(n for n in os.listxattr(p) if n.startswith("user.")) == sorted(want)


def test_symlink_copy_up_on_lchown(ovl):
    o = ovl(BASE)
    os.chown(o.p("ln"), 1234, 1235, follow_symlinks=False)
    st = os.lstat(o.u("ln"))
    assert stat.S_ISLNK(st.st_mode) and os.readlink(o.u("ln")) == "f"
    assert (st.st_uid, st.st_gid) == (1234, 1235)
    assert not os.path.lexists(o.u("f"))       # the target is not copied up


def test_ancestors_copied_up_first_with_metadata(ovl):
    o = ovl(BASE)
    with open(o.p("e/e2/deep"), "ab") as f:
        f.write(b"more\n")
    e, e2 = os.lstat(o.u("e")), os.lstat(o.u("e/e2"))
    assert stat.S_IMODE(e.st_mode) == 0o750 and (e.st_uid, e.st_gid) == (1000, 100)
    assert os.getxattr(o.u("e"), "user.dir") == b"1"
    assert stat.S_IMODE(e2.st_mode) == 0o700
    # copy-up keeps the times of the copied directories (the kernel restores the parent's
    # times after installing each child)
    assert e.st_mtime == 1_100_000_000
    assert e2.st_mtime == 1_200_000_000
    assert not wk.is_opaque_dir(o.u("e")) and not wk.is_opaque_dir(o.u("e/e2"))
    assert os.lstat(o.p("e")).st_mtime == 1_100_000_000
    # siblings of the copied path stay lower-only
    assert o.upper_names() == ["e", "e/e2", "e/e2/deep"]


def test_copy_up_of_special_file_on_open_does_not_happen(ovl):
    o = ovl(BASE)
    fd = os.open(o.p("fifo"), os.O_RDWR | os.O_NONBLOCK)
    os.close(fd)
    assert o.upper_names() == []
    os.chmod(o.p("fifo"), 0o600)
    st = os.lstat(o.u("fifo"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_copy_up_big_sparse_file(ovl):
    big = os.urandom(1 << 20) + b"\0" * (3 << 20) + os.urandom(4096)
    o = ovl({"big": big})
    with open(o.p("big"), "r+b") as f:
        f.seek(0, 2)
        f.write(b"tail")
    assert wk.read_file(o.u("big")) == big + b"tail"
    assert wk.read_file(o.p("big")) == big + b"tail"


def test_copy_up_leaves_no_temporary_names(ovl):
    o = ovl(BASE)
    for rel in ("f", "g", "d/a", "d/sub/b", "e/e2/deep"):
        with open(o.p(rel), "ab") as f:
            f.write(b"+")
    os.chmod(o.p("empty"), 0o700)
    names = o.upper_names()
    assert names == ["d", "d/a", "d/sub", "d/sub/b", "e", "e/e2", "e/e2/deep", "empty",
                     "f", "g"]
    assert sorted(os.listdir(o.p())) == sorted(["f", "g", "d", "e", "empty", "ln", "fifo"])


# ---------------------------------------------------------------------------------------------
# whiteouts and opaque directories
# ---------------------------------------------------------------------------------------------

def test_unlink_lower_file_leaves_whiteout(ovl):
    o = ovl(BASE)
    os.unlink(o.p("d/a"))
    assert not os.path.lexists(o.p("d/a"))
    assert "a" not in os.listdir(o.p("d"))
    assert is_whiteout(o.u("d/a"))
    assert os.lstat(o.u("d/a")).st_rdev == 0
    assert not wk.is_opaque_dir(o.u("d"))
    assert wk.read_file(o.stack.lowers[0] / "d/a") == b"a\n"
    assert err(os.lstat, o.p("d/a")) == "ENOENT"
    assert err(os.unlink, o.p("d/a")) == "ENOENT"


def test_whiteouts_share_one_inode_as_the_kernels_do(ovl):
    """Since Linux 5.8 the kernel hard-links one workdir whiteout for every new one; so do we
    (mknod of a device costs ext4 50-550 us, a link ~12 us). Whiteouts over nothing, over an
    upper file (copied up) and over a directory must all be links of one 0/0 device."""
    o = ovl(BASE)
    with open(o.p("g"), "ab") as fh:       # an upper copy to replace
        fh.write(b"x")
    for rel in ("f", "d/a", "d/sub/b", "g", "ln", "fifo"):
        os.unlink(o.p(rel))
    os.rmdir(o.p("empty"))
    names = ["f", "d/a", "d/sub/b", "g", "ln", "fifo", "empty"]
    sts = [os.lstat(o.u(rel)) for rel in names]
    assert all(is_whiteout(o.u(rel)) for rel in names)
    assert len({(st.st_dev, st.st_ino) for st in sts}) == 1, "whiteouts are separate inodes"
    assert sts[0].st_nlink >= len(names)
    assert sorted(os.listdir(o.p("d"))) == ["sub"] and os.listdir(o.p("d/sub")) == []


def test_unlink_upper_only_file_leaves_nothing(ovl):
    o = ovl(BASE)
    wk.write_file(o.p("d/new"), b"x")
    os.unlink(o.p("d/new"))
    assert not os.path.lexists(o.u("d/new"))


def test_unlink_copied_up_file_leaves_whiteout(ovl):
    o = ovl(BASE)
    with open(o.p("f"), "ab") as fh:
        fh.write(b"x")
    os.unlink(o.p("f"))
    assert is_whiteout(o.u("f"))
    assert not os.path.lexists(o.p("f"))


def test_rmdir_lower_empty_dir_leaves_whiteout(ovl):
    o = ovl(BASE)
    os.rmdir(o.p("empty"))
    assert is_whiteout(o.u("empty"))
    assert not os.path.lexists(o.p("empty"))


@pytest.mark.parametrize("rel", ["d", "d/sub", "e"])
def test_rmdir_non_empty_across_layers(ovl, rel):
    o = ovl(BASE)
    assert err(os.rmdir, o.p(rel)) == "ENOTEMPTY"
    assert os.path.isdir(o.p(rel))


def test_rmdir_non_empty_in_upper_only(ovl):
    o = ovl(BASE)
    os.mkdir(o.p("empty/x"))
    assert err(os.rmdir, o.p("empty")) == "ENOTEMPTY"


def test_rmdir_merged_dir_after_emptying_it(ovl):
    o = ovl(BASE)
    os.unlink(o.p("d/sub/b"))
    os.rmdir(o.p("d/sub"))
    os.unlink(o.p("d/a"))
    assert os.listdir(o.p("d")) == []
    os.rmdir(o.p("d"))
    assert not os.path.lexists(o.p("d"))
    assert is_whiteout(o.u("d"))


def test_mkdir_over_whiteout_is_opaque(ovl):
    o = ovl(BASE)
    os.unlink(o.p("d/sub/b"))
    os.rmdir(o.p("d/sub"))
    os.mkdir(o.p("d/sub"))
    assert os.listdir(o.p("d/sub")) == []
    assert stat.S_ISDIR(os.lstat(o.u("d/sub")).st_mode)
    assert wk.is_opaque_dir(o.u("d/sub"))
    # the opaque marker is the xattr, not a file
    assert os.listdir(o.u("d/sub")) == []
    wk.write_file(o.p("d/sub/c"), b"c")
    assert os.listdir(o.p("d/sub")) == ["c"]


def test_mkdir_over_whiteout_from_lower_layer_hides_below(ovl):
    o = ovl({"d": WHITEOUT_KERNEL, "e": WHITEOUT_OCI}, {"d/x": "x", "e/y": "y"})
    assert sorted(os.listdir(o.p())) == []
    os.mkdir(o.p("d"))
    os.mkdir(o.p("e"))
    assert os.listdir(o.p("d")) == [] and os.listdir(o.p("e")) == []
    # (the kernel does not mark these opaque: the lower whiteout already stops the lookup;
    # either way the layers below must stay hidden)
    wk.write_file(o.p("d/z"), b"z")
    assert os.listdir(o.p("d")) == ["z"]


def test_mkdir_of_new_name_is_not_opaque(ovl):
    o = ovl(BASE)
    os.mkdir(o.p("brandnew"))
    os.mkdir(o.p("d/brandnew"))
    assert not wk.is_opaque_dir(o.u("brandnew"))
    assert not wk.is_opaque_dir(o.u("d/brandnew"))
    assert not wk.is_opaque_dir(o.u("d"))


def test_create_file_over_whiteout(ovl):
    o = ovl(BASE)
    os.unlink(o.p("f"))
    wk.write_file(o.p("f"), b"again", flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert wk.read_file(o.p("f")) == b"again"
    st = os.lstat(o.u("f"))
    assert stat.S_ISREG(st.st_mode) and st.st_size == 5


def test_whiteouts_in_lower_layers_respected_on_write(ovl):
    o = ovl({"gone": WHITEOUT_OCI, "dir": OPAQUE_OCI, "dir/only": "top"},
            {"gone": "hidden", "dir/old": "hidden"})
    assert err(os.open, o.p("gone"), os.O_WRONLY) == "ENOENT"
    wk.write_file(o.p("gone"), b"new", flags=os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert wk.read_file(o.p("gone")) == b"new"
    with open(o.p("dir/only"), "ab") as f:
        f.write(b"+")
    assert sorted(os.listdir(o.p("dir"))) == ["only"]
    # (the kernel does not copy the opaque marker up: the lower opaque dir still stops
    # the lookup below it)
    assert not os.path.lexists(o.p("dir/old"))
    assert sorted(os.listdir(o.p("dir"))) == ["only"]


def test_wh_names_cannot_be_created(ovl):
    fuse_only("the kernel lets .wh.* names be created; we refuse them like fuse-overlayfs")
    o = ovl(BASE)
    assert err(os.open, o.p(".wh.x"), os.O_WRONLY | os.O_CREAT) == "EINVAL"
    assert err(os.mkdir, o.p("d/.wh.y")) == "EINVAL"
    assert err(os.symlink, "f", o.p(".wh.s")) == "EINVAL"
    assert err(os.mknod, o.p(".wh.n"), stat.S_IFIFO | 0o644) == "EINVAL"
    assert err(os.link, o.p("f"), o.p(".wh.l")) == "EINVAL"
    assert err(os.rename, o.p("f"), o.p(".wh.f")) == "EINVAL"
    assert err(os.open, o.p(".wh..wh..opq"), os.O_WRONLY | os.O_CREAT) == "EINVAL"
    assert o.upper_names() == [] or all(".wh." not in n for n in o.upper_names())
    assert os.path.exists(o.p("f"))


def test_mknod_whiteout_through_mount_is_eperm(ovl):
    o = ovl(BASE)
    assert err(os.mknod, o.p("wo"), stat.S_IFCHR | 0o600, 0) == "EPERM"
    assert err(os.mknod, o.p("f"), stat.S_IFCHR | 0o600, 0) == "EEXIST"
    assert not os.path.lexists(o.p("wo"))


# ---------------------------------------------------------------------------------------------
# create / mkdir / mknod / symlink / link
# ---------------------------------------------------------------------------------------------

def test_create_excl(ovl):
    o = ovl(BASE)
    assert err(os.open, o.p("f"), os.O_WRONLY | os.O_CREAT | os.O_EXCL) == "EEXIST"
    assert err(os.open, o.p("d"), os.O_WRONLY | os.O_CREAT | os.O_EXCL) == "EEXIST"
    assert err(os.open, o.p("ln"), os.O_WRONLY | os.O_CREAT | os.O_EXCL) == "EEXIST"
    assert err(os.open, o.p("nodir/x"), os.O_WRONLY | os.O_CREAT) == "ENOENT"
    assert err(os.open, o.p("f/x"), os.O_WRONLY | os.O_CREAT) == "ENOTDIR"
    assert o.upper_names() == []
    fd = os.open(o.p("d/sub/new"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"new")
    os.close(fd)
    assert stat.S_IMODE(os.lstat(o.u("d/sub/new")).st_mode) == 0o640
    assert wk.read_file(o.u("d/sub/new")) == b"new"
    assert o.upper_names() == ["d", "d/sub", "d/sub/new"]


def test_mkdir(ovl):
    o = ovl(BASE)
    assert err(os.mkdir, o.p("d")) == "EEXIST"
    assert err(os.mkdir, o.p("f")) == "EEXIST"
    assert err(os.mkdir, o.p("x/y")) == "ENOENT"
    os.mkdir(o.p("e/e2/n"), 0o711)
    assert stat.S_IMODE(os.lstat(o.u("e/e2/n")).st_mode) == 0o711
    assert os.listdir(o.p("e/e2")) == sorted(["deep", "n"]) or \
        sorted(os.listdir(o.p("e/e2"))) == ["deep", "n"]


@pytest.mark.parametrize("kind", ["fifo", "sock", "chr", "blk"])
def test_mknod_kinds(ovl, kind):
    o = ovl(BASE)
    mode, dev = {"fifo": (stat.S_IFIFO | 0o640, 0), "sock": (stat.S_IFSOCK | 0o640, 0),
                 "chr": (stat.S_IFCHR | 0o640, os.makedev(1, 3)),
                 "blk": (stat.S_IFBLK | 0o640, os.makedev(7, 0))}[kind]
    os.mknod(o.p("d/node"), mode, dev)
    for st in (os.lstat(o.p("d/node")), os.lstat(o.u("d/node"))):
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(mode)
        assert stat.S_IMODE(st.st_mode) == 0o640
        if kind in ("chr", "blk"):
            assert st.st_rdev == dev
    assert err(os.mknod, o.p("d/node"), mode, dev) == "EEXIST"


def test_symlink(ovl):
    o = ovl(BASE)
    os.symlink("../f", o.p("d/sl"))
    assert os.readlink(o.p("d/sl")) == "../f" == os.readlink(o.u("d/sl"))
    assert wk.read_file(o.p("d/sl")) == b"lower f\n"
    assert err(os.symlink, "x", o.p("f")) == "EEXIST"
    assert err(os.symlink, "x", o.p("ln")) == "EEXIST"


def test_link_to_lower_file(ovl):
    o = ovl(BASE)
    os.link(o.p("g"), o.p("d/g2"))
    a, b = os.lstat(o.p("g")), os.lstat(o.p("d/g2"))
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    ua, ub = os.lstat(o.u("g")), os.lstat(o.u("d/g2"))
    assert ua.st_ino == ub.st_ino and ua.st_nlink == 2
    assert (stat.S_IMODE(ua.st_mode), ua.st_uid) == (0o640, 1000)
    with open(o.p("d/g2"), "ab") as f:
        f.write(b"via link\n")
    assert wk.read_file(o.p("g")) == b"lower g\nvia link\n"
    os.unlink(o.p("g"))
    assert is_whiteout(o.u("g"))
    assert os.lstat(o.p("d/g2")).st_nlink == 1
    assert wk.read_file(o.p("d/g2")) == b"lower g\nvia link\n"


def test_link_errors(ovl):
    o = ovl(BASE)
    assert err(os.link, o.p("d"), o.p("d2")) == "EPERM"
    assert err(os.link, o.p("f"), o.p("g")) == "EEXIST"
    assert err(os.link, o.p("nope"), o.p("x")) == "ENOENT"
    assert err(os.link, o.p("f"), o.p("nodir/x")) == "ENOENT"


def test_link_of_symlink_and_fifo(ovl):
    o = ovl(BASE)
    os.link(o.p("ln"), o.p("ln2"), follow_symlinks=False)
    assert os.readlink(o.p("ln2")) == "f"
    os.link(o.p("fifo"), o.p("fifo2"))
    assert stat.S_ISFIFO(os.lstat(o.p("fifo2")).st_mode)
    assert os.lstat(o.p("fifo")).st_ino == os.lstat(o.p("fifo2")).st_ino


# ---------------------------------------------------------------------------------------------
# unlink / rmdir errors
# ---------------------------------------------------------------------------------------------

def test_unlink_rmdir_errors(ovl):
    o = ovl(BASE)
    assert err(os.unlink, o.p("d")) == "EISDIR"
    assert err(os.rmdir, o.p("f")) == "ENOTDIR"
    assert err(os.rmdir, o.p("ln")) == "ENOTDIR"
    assert err(os.unlink, o.p("missing")) == "ENOENT"
    assert err(os.rmdir, o.p("missing")) == "ENOENT"
    assert err(os.unlink, o.p("f/x")) == "ENOTDIR"
    assert o.upper_names() == []


def test_unlink_symlink_and_fifo(ovl):
    o = ovl(BASE)
    os.unlink(o.p("ln"))
    os.unlink(o.p("fifo"))
    assert is_whiteout(o.u("ln")) and is_whiteout(o.u("fifo"))
    assert os.path.exists(o.p("f"))


# ---------------------------------------------------------------------------------------------
# rename
# ---------------------------------------------------------------------------------------------

def test_rename_lower_file_leaves_whiteout(ovl):
    o = ovl(BASE)
    os.rename(o.p("f"), o.p("f2"))
    assert not os.path.lexists(o.p("f"))
    assert wk.read_file(o.p("f2")) == b"lower f\n"
    assert is_whiteout(o.u("f"))
    assert wk.read_file(o.u("f2")) == b"lower f\n"


def test_rename_across_dirs(ovl):
    o = ovl(BASE)
    os.rename(o.p("d/sub/b"), o.p("e/e2/b"))
    assert is_whiteout(o.u("d/sub/b"))
    assert wk.read_file(o.u("e/e2/b")) == b"b\n"
    assert stat.S_IMODE(os.lstat(o.u("e")).st_mode) == 0o750
    assert sorted(os.listdir(o.p("e/e2"))) == ["b", "deep"]
    assert os.listdir(o.p("d/sub")) == []


def test_rename_replaces_lower_target(ovl):
    o = ovl(BASE)
    os.rename(o.p("d/a"), o.p("f"))
    assert wk.read_file(o.p("f")) == b"a\n"
    assert is_whiteout(o.u("d/a"))
    assert wk.read_file(o.u("f")) == b"a\n"


def test_rename_upper_file_over_lower(ovl):
    o = ovl(BASE)
    wk.write_file(o.p("new"), b"new")
    os.rename(o.p("new"), o.p("g"))
    assert wk.read_file(o.p("g")) == b"new"
    assert not os.path.lexists(o.u("new"))       # pure upper source: no whiteout
    assert "new" not in os.listdir(o.p())


def test_rename_noreplace(ovl):
    o = ovl(BASE)
    assert err(wk.renameat2, o.p("f"), o.p("g"), wk.RENAME_NOREPLACE) == "EEXIST"
    assert err(wk.renameat2, o.p("f"), o.p("d"), wk.RENAME_NOREPLACE) == "EEXIST"
    os.unlink(o.p("g"))
    wk.renameat2(o.p("f"), o.p("g"), wk.RENAME_NOREPLACE)   # a whiteout is no target
    assert wk.read_file(o.p("g")) == b"lower f\n"
    assert is_whiteout(o.u("f"))
    assert not os.path.lexists(o.p("f"))


def test_rename_exchange_files(ovl):
    o = ovl(BASE)
    wk.renameat2(o.p("f"), o.p("d/a"), wk.RENAME_EXCHANGE)
    assert wk.read_file(o.p("f")) == b"a\n"
    assert wk.read_file(o.p("d/a")) == b"lower f\n"
    assert wk.read_file(o.u("f")) == b"a\n"
    assert wk.read_file(o.u("d/a")) == b"lower f\n"
    assert err(wk.renameat2, o.p("f"), o.p("missing"), wk.RENAME_EXCHANGE) == "ENOENT"


def test_rename_exchange_upper_dirs(ovl):
    o = ovl(BASE)
    os.makedirs(o.p("p1/x"))
    os.makedirs(o.p("p2/y"))
    wk.renameat2(o.p("p1"), o.p("p2"), wk.RENAME_EXCHANGE)
    assert os.listdir(o.p("p1")) == ["y"] and os.listdir(o.p("p2")) == ["x"]
    assert os.listdir(o.u("p1")) == ["y"]


def test_rename_flags_invalid(ovl):
    o = ovl(BASE)
    assert err(wk.renameat2, o.p("f"), o.p("g"),
               wk.RENAME_NOREPLACE | wk.RENAME_EXCHANGE) == "EINVAL"
    assert err(wk.renameat2, o.p("f"), o.p("f2"), wk.RENAME_WHITEOUT) == "EINVAL"
    assert err(wk.renameat2, o.p("f"), o.p("f2"), 1 << 7) == "EINVAL"
    assert os.path.exists(o.p("f")) and not os.path.lexists(o.p("f2"))
    assert o.upper_names() == []


def test_removed_directory_fd(ovl):
    o = ovl(BASE)
    os.mkdir(o.p("nd"))
    fd = os.open(o.p("nd"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(o.p("nd"))
        os.fsync(fd)
        assert os.listdir(fd) == []
        assert err(os.open, "x", os.O_WRONLY | os.O_CREAT, dir_fd=fd) == "ENOENT"
    finally:
        os.close(fd)
    # the same for a lower directory (it becomes a whiteout)
    fd = os.open(o.p("empty"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(o.p("empty"))
        assert os.listdir(fd) == []
        assert err(os.mkdir, "x", dir_fd=fd) == "ENOENT"
    finally:
        os.close(fd)
    assert is_whiteout(o.u("empty"))


def test_rename_lower_dir_is_exdev(ovl):
    o = ovl(BASE)
    assert err(os.rename, o.p("d"), o.p("d2")) == "EXDEV"
    assert err(os.rename, o.p("empty"), o.p("empty2")) == "EXDEV"
    assert err(os.rename, o.p("d/sub"), o.p("sub")) == "EXDEV"
    # a merged dir (upper + lower) is no different
    wk.write_file(o.p("e/n"), b"n")
    assert err(os.rename, o.p("e"), o.p("e3")) == "EXDEV"
    assert os.path.isdir(o.p("d")) and not os.path.lexists(o.p("d2"))


def test_rename_pure_upper_dir(ovl):
    o = ovl(BASE)
    os.makedirs(o.p("nd/inner"))
    wk.write_file(o.p("nd/inner/f"), b"f")
    os.rename(o.p("nd"), o.p("d/moved"))
    assert wk.read_file(o.p("d/moved/inner/f")) == b"f"
    assert not os.path.lexists(o.p("nd")) and not os.path.lexists(o.u("nd"))
    assert wk.read_file(o.u("d/moved/inner/f")) == b"f"


def test_rename_pure_upper_dir_over_whiteout_of_lower_dir(ovl):
    o = ovl(BASE)
    os.unlink(o.p("d/sub/b"))
    os.rmdir(o.p("d/sub"))
    os.mkdir(o.p("fresh"))
    wk.write_file(o.p("fresh/x"), b"x")
    os.rename(o.p("fresh"), o.p("d/sub"))
    assert os.listdir(o.p("d/sub")) == ["x"]     # lower d/sub/b must not come back
    assert wk.is_opaque_dir(o.u("d/sub"))


def test_rename_dir_errors(ovl):
    o = ovl(BASE)
    os.mkdir(o.p("nd"))
    os.mkdir(o.p("nd2"))
    wk.write_file(o.p("nd2/x"), b"")
    assert err(os.rename, o.p("nd"), o.p("f")) == "ENOTDIR"
    assert err(os.rename, o.p("f"), o.p("nd")) == "EISDIR"
    assert err(os.rename, o.p("nd"), o.p("nd2")) == "ENOTEMPTY"
    assert err(os.rename, o.p("nd"), o.p("d")) in ("ENOTEMPTY", "EXDEV")
    assert err(os.rename, o.p("nd"), o.p("nd/sub")) == "EINVAL"
    assert err(os.rename, o.p("missing"), o.p("x")) == "ENOENT"


def test_rename_pure_upper_dir_over_empty_lower_dir(ovl):
    o = ovl(BASE)
    os.mkdir(o.p("nd"))
    wk.write_file(o.p("nd/x"), b"x")
    os.rename(o.p("nd"), o.p("empty"))
    assert os.listdir(o.p("empty")) == ["x"]
    assert wk.is_opaque_dir(o.u("empty"))


def test_rename_to_same_name_and_hardlink_alias(ovl):
    o = ovl(BASE)
    os.rename(o.p("f"), o.p("f"))
    assert o.upper_names() == [] or o.upper_names() == ["f"]
    os.link(o.p("f"), o.p("f2"))
    os.rename(o.p("f"), o.p("f2"))        # same inode: a no-op
    assert os.path.exists(o.p("f")) and os.path.exists(o.p("f2"))


def test_dpkg_replace_pattern(ovl):
    """echo new > f.new; mv f.new f; rm f: f stays gone (f exists in a lower layer)."""
    o = ovl(BASE)
    wk.write_file(o.p("f.new"), b"new\n")
    os.rename(o.p("f.new"), o.p("f"))
    assert wk.read_file(o.p("f")) == b"new\n"
    os.unlink(o.p("f"))
    assert not os.path.lexists(o.p("f"))
    assert "f" not in os.listdir(o.p())
    assert is_whiteout(o.u("f"))
    assert not os.path.lexists(o.u("f.new"))
    # the same with a subdirectory and shell tools
    subprocess.run(f"cd {o.p('d')} && echo new > a.dpkg-new && mv a.dpkg-new a && rm a",
                   shell=True, check=True)
    assert sorted(os.listdir(o.p("d"))) == ["sub"]
    assert is_whiteout(o.u("d/a"))


def test_rename_over_whiteout_then_unlink_in_lower_opaque_dir(ovl):
    o = ovl({"d": OPAQUE_KERNEL, "d/a": "top"}, {"d/b": "hidden"})
    os.rename(o.p("d/a"), o.p("d/b"))
    assert os.listdir(o.p("d")) == ["b"]
    os.unlink(o.p("d/b"))
    assert os.listdir(o.p("d")) == []


# ---------------------------------------------------------------------------------------------
# data, attributes, xattrs, fsync
# ---------------------------------------------------------------------------------------------

def test_setattr_on_upper_and_merged_dirs(ovl):
    o = ovl(BASE)
    os.chmod(o.p("d"), 0o711)
    os.chown(o.p("d"), 5, 6)
    st = os.lstat(o.u("d"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 5, 6)
    assert not wk.is_opaque_dir(o.u("d"))
    assert sorted(os.listdir(o.p("d"))) == ["a", "sub"]
    st = os.lstat(o.p("d"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o711, 5, 6)


def test_utime_symlink_nofollow(ovl):
    o = ovl(BASE)
    os.utime(o.p("ln"), ns=(5_000_000_000, 6_000_000_000), follow_symlinks=False)
    assert os.lstat(o.p("ln")).st_mtime_ns == 6_000_000_000
    assert os.lstat(o.u("ln")).st_mtime_ns == 6_000_000_000
    assert os.lstat(o.p("f")).st_mtime_ns != 6_000_000_000


def test_xattr_errors_and_values(ovl):
    o = ovl(BASE)
    p = o.p("g")
    assert err(os.removexattr, p, "user.nope") == "ENODATA"
    assert o.upper_names() in ([], ["g"])
    assert err(os.setxattr, p, "user.k", b"x", os.XATTR_CREATE) == "EEXIST"
    assert err(os.setxattr, p, "user.other", b"x", os.XATTR_REPLACE) == "ENODATA"
    os.setxattr(p, "user.k", b"replaced", os.XATTR_REPLACE)
    os.setxattr(p, "user.big", b"\0\1\2" * 1000)
    assert os.getxattr(p, "user.k") == b"replaced"
    assert os.getxattr(p, "user.big") == b"\0\1\2" * 1000
    assert os.getxattr(o.u("g"), "user.big") == b"\0\1\2" * 1000
    assert err(os.getxattr, p, "user.nope") == "ENODATA"


def test_xattr_list_after_a_capability_probe(ovl):
    """A diff walk (containers/storage with a mount_program) asks each file for
    security.capability and then for its xattr list; the daemon answers that list from the
    probe (ops.listxattr). It must stay exact: for files, directories and symlinks, lower
    and upper, and after a change made between the two requests."""
    o = ovl({"f": File("f", xattrs={"user.a": b"1", "trusted.t": b"2"}),
             "d": Dir(xattrs={"user.d": b"3"}), "d/x": "x", "l": Symlink("f"), "g": "g"})
    cap = "security.capability"

    def probe(name):
        assert err(os.getxattr, o.p(name), cap, follow_symlinks=False) == "ENODATA"
        return sorted(os.listxattr(o.p(name), follow_symlinks=False))

    assert probe("f") == ["trusted.t", "user.a"]
    assert probe("d") == ["user.d"]
    assert probe("l") == []
    assert probe("g") == []
    # a change between the probe and the list is seen by the list
    assert err(os.getxattr, o.p("g"), cap) == "ENODATA"
    os.setxattr(o.p("g"), "user.new", b"v")
    assert os.listxattr(o.p("g")) == ["user.new"]
    assert probe("g") == ["user.new"]
    os.removexattr(o.p("f"), "user.a")
    assert probe("f") == ["trusted.t"]
    # a file given a capability shows it, and lists it, afterwards
    value = bytes.fromhex("0100000200100000000000000000000000000000")   # cap_net_raw
    os.setxattr(o.p("g"), cap, value)
    assert os.getxattr(o.p("g"), cap) == value
    assert sorted(os.listxattr(o.p("g"))) == [cap, "user.new"]


def test_private_overlay_xattrs_do_not_leak_or_take_effect(ovl):
    o = ovl({"d": OPAQUE_KERNEL, "d/x": "x", "m/x": "x"}, {"d/y": "y", "m/y": "y"})
    assert not any(n.startswith("trusted.overlay.") for n in os.listxattr(o.p("d")))
    assert err(os.getxattr, o.p("d"), "trusted.overlay.opaque") in ("ENODATA", "ENOTSUP")
    # Setting an overlay xattr through the mount must not change the overlay's own
    # semantics: the kernel (6.7 and later) and we store it escaped, as
    # trusted.overlay.overlay.* (tests/test_xattr_escape.py)
    r = wk.attempt(os.setxattr, o.p("m"), "trusted.overlay.opaque", b"y")
    assert r[0] == "ok", r
    assert sorted(os.listdir(o.p("m"))) == ["x", "y"]
    assert not wk.is_opaque_dir(o.u("m"))


def test_fsync_and_fsyncdir(ovl):
    o = ovl(BASE)
    fd = os.open(o.p("f"), os.O_RDWR)
    try:
        os.pwrite(fd, b"LOWER", 0)
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert wk.read_file(o.u("f")) == b"LOWER f\n"
    for rel in ("d", "e/e2", ""):
        dfd = os.open(o.p(rel), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    # fsync of a lower file opened read-only is fine and does not copy it up
    fd = os.open(o.p("g"), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert not os.path.lexists(o.u("g"))


def test_unlink_open_file_keeps_fd_working(ovl):
    o = ovl(BASE)
    fd = os.open(o.p("f"), os.O_RDWR)
    rfd = os.open(o.p("g"), os.O_RDONLY)
    try:
        os.unlink(o.p("f"))
        os.unlink(o.p("g"))
        assert not os.path.lexists(o.p("f")) and not os.path.lexists(o.p("g"))
        assert is_whiteout(o.u("f")) and is_whiteout(o.u("g"))
        os.pwrite(fd, b"after unlink", 0)
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"after unlink"
        assert os.fstat(fd).st_nlink == 0
        os.ftruncate(fd, 3)
        assert os.fstat(fd).st_size == 3
        assert os.pread(rfd, 100, 0) == b"lower g\n"
        # the name can be reused meanwhile
        wk.write_file(o.p("f"), b"reborn")
        assert wk.read_file(o.p("f")) == b"reborn"
        assert os.pread(fd, 100, 0) == b"aft"
    finally:
        os.close(fd)
        os.close(rfd)
    assert wk.read_file(o.p("f")) == b"reborn"


def test_unlink_open_upper_file_then_rename_over(ovl):
    o = ovl(BASE)
    wk.write_file(o.p("tmp"), b"one")
    fd = os.open(o.p("tmp"), os.O_RDWR)
    try:
        wk.write_file(o.p("tmp2"), b"two")
        os.rename(o.p("tmp2"), o.p("tmp"))
        assert os.pread(fd, 10, 0) == b"one"
        os.pwrite(fd, b"ONE", 0)
        assert wk.read_file(o.p("tmp")) == b"two"
    finally:
        os.close(fd)
    assert wk.read_file(o.p("tmp")) == b"two"


def test_write_through_two_fds_and_mmap(ovl):
    import mmap
    o = ovl({"m": b"0" * 8192})
    fd1 = os.open(o.p("m"), os.O_RDWR)
    fd2 = os.open(o.p("m"), os.O_RDWR)
    try:
        os.pwrite(fd1, b"AAAA", 0)
        assert os.pread(fd2, 4, 0) == b"AAAA"
        with mmap.mmap(fd2, 8192) as mm:
            mm[100:104] = b"BBBB"
            mm.flush()
        assert os.pread(fd1, 4, 100) == b"BBBB"
    finally:
        os.close(fd1)
        os.close(fd2)
    data = wk.read_file(o.u("m"))
    assert data[:4] == b"AAAA" and data[100:104] == b"BBBB" and len(data) == 8192


# ---------------------------------------------------------------------------------------------
# fsync policy (volatile / fsync=0)
# ---------------------------------------------------------------------------------------------

def _count_fsyncs(make_layers, mounted, tmp_path, options):
    fuse_only("counts the daemon's fsync syscalls with strace")
    import shutil
    if not shutil.which("strace"):
        pytest.skip("strace not installed")
    stack = make_layers(BASE, upper=True)
    log = tmp_path / f"strace-{'-'.join(options) or 'default'}.log"
    m = mounted(stack, options=options,
                wrapper=["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,syncfs,sync",
                         "-o", str(log)])
    mnt = Path(wk.mp(m))
    fd = os.open(mnt / "f", os.O_RDWR)          # copy-up (the kernel fsyncs the copy)
    try:
        os.write(fd, b"x")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    wk.write_file(mnt / "d/new", b"y", fsync=True)
    dfd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    text = log.read_text() if log.exists() else ""
    return len(re.findall(r"\b(fsync|fdatasync|syncfs|sync)\(", text)), text


def test_fsync_reaches_upper_by_default(make_layers, mounted, tmp_path):
    n, text = _count_fsyncs(make_layers, mounted, tmp_path, ())
    assert n > 0, "no fsync reached the upper layer:\n" + text


@pytest.mark.parametrize("options", [("volatile",), ("fsync=0",)])
def test_volatile_and_fsync0_skip_fsync(make_layers, mounted, tmp_path, options):
    n, text = _count_fsyncs(make_layers, mounted, tmp_path, options)
    assert n == 0, f"{options}: {n} sync calls reached the upper layer:\n" + text


# ---------------------------------------------------------------------------------------------
# hard links inside a lower layer
# ---------------------------------------------------------------------------------------------

# FUSE names an inode, not the path it was reached by: when several names of one lower hard
# link are in use they share one kernel inode, so a change made through any of them is
# applied to the name first looked up. fuse-overlayfs has the same limit.
OURS_INODE_ONLY = pytest.mark.xfail(
    not wk.kernel_mode() and not wk.is_fuse_overlayfs(), strict=True,
    reason="FUSE passes only the inode: with several names of one lower hard link in use, "
           "the changed name cannot be told apart (README: known divergences)")


@pytest.mark.parametrize("name", ["a", pytest.param("h", marks=OURS_INODE_ONLY)])
@pytest.mark.parametrize("how", ["append", "truncate", "chmod", "setxattr", "removexattr",
                                 "utime"])
def test_lower_hardlinks_break_on_copy_up(ovl, how, name):
    """Without an index (the kernel's default here), copying up one name of a lower hard
    link breaks the link: the name changed shows the change, the other names keep showing
    the lower file (content, size, mode, xattrs, times, link count), and only the changed
    name is copied up."""
    from layerkit import Hardlink
    o = ovl({"a": File("lower a\n", mtime=1_000_000_000, xattrs={"user.k": b"v"}),
             "h": Hardlink("a"), "d/h2": Hardlink("a")})
    # look every alias up first (an implementation keyed by the lower inode then holds
    # one node for all three names)
    assert [os.lstat(o.p(n)).st_nlink for n in ("a", "h", "d/h2")] == [3, 3, 3]
    assert wk.read_file(o.p("h")) == b"lower a\n"
    p = o.p(name)
    want = {"data": b"lower a\n", "mode": 0o644, "mtime": 1_000_000_000,
            "xattrs": {"user.k": b"v"}}
    if how == "append":
        with open(p, "ab") as f:
            f.write(b"new\n")
        want["data"] = b"lower a\nnew\n"
    elif how == "truncate":
        os.truncate(p, 3)
        want["data"] = b"low"
    elif how == "chmod":
        os.chmod(p, 0o600)
        want["mode"] = 0o600
    elif how == "setxattr":
        os.setxattr(p, "user.x", b"1")
        want["xattrs"] = {"user.k": b"v", "user.x": b"1"}
    elif how == "removexattr":
        os.removexattr(p, "user.k")
        want["xattrs"] = {}
    elif how == "utime":
        os.utime(p, (5, 5))
        want["mtime"] = 5
    others = [n for n in ("a", "h", "d/h2") if n != name]
    st = os.lstat(p)
    got = {"data": wk.read_file(p), "mode": stat.S_IMODE(st.st_mode),
           "xattrs": {x: os.getxattr(p, x) for x in os.listxattr(p) if x.startswith("user.")}}
    if how not in ("append", "truncate"):
        got["mtime"] = st.st_mtime
    else:
        want.pop("mtime")
    assert got == want, f"{name} does not show the change"
    assert st.st_nlink == 1
    for alias in others:
        st = os.lstat(o.p(alias))
        assert wk.read_file(o.p(alias)) == b"lower a\n", alias
        assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime, st.st_nlink) == \
            (8, 0o644, 1_000_000_000, 3), alias
        assert [x for x in os.listxattr(o.p(alias)) if x.startswith("user.")] == ["user.k"], \
            alias
        assert st.st_ino != os.lstat(p).st_ino
    assert os.lstat(o.p(others[0])).st_ino == os.lstat(o.p(others[1])).st_ino
    assert o.upper_names() == ([name] if "/" not in name else ["d", name])


@pytest.mark.xfail(not wk.kernel_mode() and not wk.is_fuse_overlayfs()
                   and not wk.passthrough_by_default(), strict=True,
                   reason="the FUSE kernel drops the link count of the shared inode itself "
                          "and, with the writeback cache, keeps it (README: known divergences;"
                          " with passthrough there is no writeback cache)")
def test_unlink_of_lower_hardlink_alias(ovl):
    """Deleting one name of a lower hard link (a whiteout) leaves the others as they are,
    including the lower link count the kernel keeps reporting."""
    from layerkit import Hardlink
    o = ovl({"a": "lower a\n", "h": Hardlink("a")})
    assert os.lstat(o.p("a")).st_nlink == os.lstat(o.p("h")).st_nlink == 2
    os.unlink(o.p("h"))
    assert is_whiteout(o.u("h"))
    assert wk.read_file(o.p("a")) == b"lower a\n"
    assert os.lstat(o.p("a")).st_nlink == 2
    assert o.upper_names() == ["h"]


def test_fchmod_through_a_read_only_fd_of_a_deleted_upper_file(ovl):
    """fchmod/fchown/futimens need no write access to the fd: they work on an open file
    after its name is gone, as on a local filesystem (sed -i's temp file pattern)."""
    o = ovl({"d/keep": "k"})
    with open(o.p("d/f"), "w") as f:
        f.write("x")
    fd = os.open(o.p("d/f"), os.O_RDONLY)
    try:
        os.unlink(o.p("d/f"))
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime_ns == 2_000_000_000
        assert st.st_nlink == 0
    finally:
        os.close(fd)
    assert not os.path.lexists(o.u("d/f"))


def test_rename_of_lower_hardlink_alias_copies_that_name(ovl):
    """mv of the second-looked-up name of a lower hard link copies up that name (not the
    first one the kernel saw) and whites it out: the upper layer is the kernel's."""
    from layerkit import Hardlink
    o = ovl({"b": "lower b\n", "c": Hardlink("b")})
    assert sorted(os.listdir(o.p())) == ["b", "c"]
    os.lstat(o.p("b"))
    os.rename(o.p("c"), o.p("a"))
    assert wk.read_file(o.p("a")) == b"lower b\n"
    assert o.upper_names() == ["a", "c"]
    assert is_whiteout(o.u("c")) and wk.read_file(o.u("a")) == b"lower b\n"
    assert not os.path.lexists(o.p("c"))


# ---------------------------------------------------------------------------------------------
# times, big directories
# ---------------------------------------------------------------------------------------------

def _times(p):
    st = os.lstat(p)
    return st.st_mtime_ns, st.st_ctime_ns


def test_times_follow_changes(ovl):
    """What stat shows through the mount is what the upper holds, and it moves on with
    every change (make and friends depend on mtimes)."""
    old = 1_000_000_000
    o = ovl({"d/f": File("x\n", mtime=old), "d/g": File("y\n", mtime=old),
             "d/": Dir(mtime=old)})
    with open(o.p("d/f"), "ab") as f:
        f.write(b"more\n")
    m1 = os.lstat(o.p("d/f")).st_mtime_ns
    assert m1 > old * 10**9
    assert m1 == os.lstat(o.u("d/f")).st_mtime_ns
    time.sleep(0.02)
    with open(o.p("d/f"), "ab") as f:
        f.write(b"again\n")
    assert os.lstat(o.p("d/f")).st_mtime_ns > m1
    assert os.lstat(o.p("d/f")).st_mtime_ns == os.lstat(o.u("d/f")).st_mtime_ns
    # directory times: create / unlink / rename in it
    for step in ("create", "unlink", "rename"):
        before = os.lstat(o.p("d")).st_mtime_ns
        time.sleep(0.02)
        if step == "create":
            wk.write_file(o.p("d/new"), b"n")
        elif step == "unlink":
            os.unlink(o.p("d/g"))
        else:
            os.rename(o.p("d/new"), o.p("d/new2"))
        after = os.lstat(o.p("d")).st_mtime_ns
        assert after > before, f"{step}: directory mtime did not move"
        assert after == os.lstat(o.u("d")).st_mtime_ns, step
    # ctime moves on chmod
    c0 = os.lstat(o.p("d/f")).st_ctime_ns
    time.sleep(0.02)
    os.chmod(o.p("d/f"), 0o600)
    assert os.lstat(o.p("d/f")).st_ctime_ns > c0


def test_rm_rf_big_merged_directory(ovl):
    """readdir + unlink during the listing (rm -rf, shutil.rmtree) over a directory merged
    from two layers and the upper: nothing is skipped, nothing listed twice."""
    n = 1500
    o = ovl({f"big/a{i:04d}": "a" for i in range(0, n, 2)} | {"big/sub/x": "x"},
            {f"big/a{i:04d}": "b" for i in range(1, n, 2)} | {"big/sub/y": "y"})
    for i in range(0, n, 7):
        os.unlink(o.p(f"big/a{i:04d}"))
    for i in range(300):
        wk.write_file(o.p(f"big/u{i:03d}"), b"u")
    names = os.listdir(o.p("big"))
    assert len(names) == len(set(names))
    assert set(names) == ({f"a{i:04d}" for i in range(n) if i % 7} | {"sub"}
                          | {f"u{i:03d}" for i in range(300)})
    # delete while iterating one open directory stream
    with os.scandir(o.p("big")) as it:
        seen = []
        for e in it:
            seen.append(e.name)
            if e.is_dir(follow_symlinks=False):
                continue
            os.unlink(e.path)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    left = os.listdir(o.p("big"))
    assert left == ["sub"], f"entries survived: {sorted(left)[:10]} ({len(left)})"
    subprocess.run(["rm", "-rf", str(o.p("big"))], check=True)
    assert not os.path.lexists(o.p("big"))
    assert is_whiteout(o.u("big"))


# ---------------------------------------------------------------------------------------------
# an unprivileged caller
# ---------------------------------------------------------------------------------------------

USER = 1000


def _create(path, data=b"u"):
    def fn():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, data)
        os.close(fd)
    return fn


def _append(path):
    def fn():
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"+")
        os.close(fd)
    return fn


def test_unprivileged_caller(ovl):
    o = ovl({
        "pub": Dir(mode=0o777),
        "pub/rootfile": "r\n",
        "priv": Dir(mode=0o755),
        "priv/mine": File("m\n", uid=USER, gid=USER),
        "priv/theirs": "t\n",
        "tmp": Dir(mode=0o1777),
        "tmp/rootfile": "r\n",
        "tmp/userfile": File("u\n", uid=USER, gid=USER),
        "secret": Dir(mode=0o700),
        "secret/f": "s\n",
    })
    wk.make_traversable(o.mnt.parent)
    ok = lambda fn: wk.run_as(USER, USER, fn)      # noqa: E731
    # creating in a world-writable lower dir: the new file is the caller's; the copied-up
    # directory keeps its owner and mode
    assert ok(_create(o.p("pub/new"))) == "ok"
    st = os.lstat(o.u("pub/new"))
    assert (st.st_uid, st.st_gid) == (USER, USER)
    st = os.lstat(o.u("pub"))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o777)
    assert ok(lambda: os.mkdir(o.p("pub/newdir"))) == "ok"
    assert os.lstat(o.u("pub/newdir")).st_uid == USER
    # no permission, no copy-up
    assert ok(_append(o.p("priv/theirs"))) == "EACCES"
    assert ok(lambda: os.chmod(o.p("priv/theirs"), 0o666)) == "EPERM"
    assert ok(lambda: os.chown(o.p("priv/theirs"), USER, USER)) == "EPERM"
    assert ok(lambda: os.truncate(o.p("priv/theirs"), 0)) == "EACCES"
    assert ok(lambda: os.setxattr(o.p("priv/theirs"), "user.x", b"1")) in ("EACCES", "EPERM")
    assert ok(_create(o.p("priv/new"))) == "EACCES"
    assert ok(lambda: os.unlink(o.p("priv/theirs"))) == "EACCES"
    assert ok(lambda: os.rename(o.p("priv/theirs"), o.p("pub/stolen"))) == "EACCES"
    assert ok(lambda: os.listdir(o.p("secret"))) == "EACCES"
    assert ok(lambda: os.stat(o.p("secret/f"))) == "EACCES"
    assert not os.path.lexists(o.u("priv"))
    assert not os.path.lexists(o.u("secret"))
    # a file of one's own in a directory one cannot write: the copy-up is the overlay's job
    assert ok(_append(o.p("priv/mine"))) == "ok"
    assert wk.read_file(o.u("priv/mine")) == b"m\n+"
    st = os.lstat(o.u("priv/mine"))
    assert (st.st_uid, st.st_gid) == (USER, USER)
    assert ok(lambda: os.chmod(o.p("priv/mine"), 0o600)) == "ok"
    # sticky directory
    assert ok(lambda: os.unlink(o.p("tmp/rootfile"))) == "EPERM"
    assert ok(lambda: os.rename(o.p("tmp/rootfile"), o.p("tmp/x"))) == "EPERM"
    assert ok(lambda: os.unlink(o.p("tmp/userfile"))) == "ok"
    assert is_whiteout(o.u("tmp/userfile"))
    assert os.path.exists(o.p("tmp/rootfile"))
    # links: protected_hardlinks forbids linking a file one neither owns nor can write
    r = ok(lambda: os.link(o.p("pub/rootfile"), o.p("pub/hl")))
    protected = Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    assert r == ("EPERM" if protected else "ok")


# ---------------------------------------------------------------------------------------------
# O_TMPFILE, hole punching and SEEK_DATA/SEEK_HOLE (vendor/pyfuse3 patches 0007-0010; more in
# test_fileops.py)
# ---------------------------------------------------------------------------------------------

def test_o_tmpfile(ovl):
    o = ovl(BASE)
    fd = os.open(o.p("d"), os.O_TMPFILE | os.O_RDWR, 0o600)
    try:
        os.write(fd, b"tmp")
        assert os.pread(fd, 10, 0) == b"tmp"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert sorted(os.listdir(o.p("d"))) == ["a", "sub"]


def test_punch_hole(ovl):
    import ctypes
    o = ovl({"f": b"x" * 10000})
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(o.p("f"), os.O_RDWR)
    try:
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        assert os.pread(fd, 4096, 0) == b"\0" * 4096
        assert os.fstat(fd).st_size == 10000
    finally:
        os.close(fd)


def test_seek_hole_on_sparse_upper_file(ovl):
    o = ovl(BASE)
    fd = os.open(o.p("sparse"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"a", 1 << 20)
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        assert os.lseek(fd, 0, os.SEEK_DATA) == 1 << 20
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# file capabilities and setuid bits
# ---------------------------------------------------------------------------------------------

# struct vfs_cap_data, revision 2, effective, permitted = CAP_NET_RAW
CAP_NET_RAW = bytes.fromhex("01000002") + (1 << 13).to_bytes(4, "little") + bytes(12)


@pytest.mark.parametrize("how", ["setxattr", "chmod", "utime", "open-rw"])
def test_copy_up_keeps_security_capability(ovl, how):
    """Copy-up must not lose security.capability (a userspace copy-up has to set it after
    chown, which clears it). Changing the file's metadata does not drop it either."""
    o = ovl({"bin/ping": File(b"\x7fELF ping", mode=0o755,
                              xattrs={"security.capability": CAP_NET_RAW})})
    p = o.p("bin/ping")
    if how == "setxattr":
        os.setxattr(p, "user.x", b"1")
    elif how == "chmod":
        os.chmod(p, 0o711)
    elif how == "utime":
        os.utime(p, (1, 1))
    elif how == "open-rw":
        os.close(os.open(p, os.O_RDWR))
    assert os.path.exists(o.u("bin/ping")), "not copied up"
    assert os.getxattr(o.u("bin/ping"), "security.capability") == CAP_NET_RAW
    assert os.getxattr(p, "security.capability") == CAP_NET_RAW


@pytest.mark.parametrize("how", ["write", "chown"])
def test_write_or_chown_drops_security_capability(ovl, how):
    o = ovl({"bin/ping": File(b"\x7fELF ping", mode=0o755,
                              xattrs={"security.capability": CAP_NET_RAW})})
    p = o.p("bin/ping")
    if how == "write":
        with open(p, "ab") as f:
            f.write(b"+")
    else:
        os.chown(p, 0, 0)
    assert err(os.getxattr, p, "security.capability") == "ENODATA"
    assert err(os.getxattr, o.u("bin/ping"), "security.capability") == "ENODATA"


def _posix_acl(entries):
    import struct
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


# user::rwx user:1000:rwx group::r-x mask::rwx other::r-x
ACL_USER_RWX = _posix_acl([(1, 7, 0xFFFFFFFF), (2, 7, USER), (4, 5, 0xFFFFFFFF),
                           (0x10, 7, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)])


def test_posix_acls_are_honoured_and_copied_up(ovl):
    """POSIX ACLs in a lower layer grant access exactly as they do on the kernel overlay,
    and copy-up keeps them."""
    o = ovl({"d": Dir(mode=0o775, xattrs={"system.posix_acl_access": ACL_USER_RWX}),
             "d/f": "x\n",
             "f": File("y\n", mode=0o664, xattrs={"system.posix_acl_access": ACL_USER_RWX})})
    wk.make_traversable(o.mnt.parent)
    assert os.getxattr(o.p("f"), "system.posix_acl_access") == ACL_USER_RWX

    def append():
        fd = os.open(o.p("f"), os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"+")
        os.close(fd)
    assert wk.run_as(USER, USER, append) == "ok"
    assert wk.read_file(o.p("f")) == b"y\n+"
    assert os.getxattr(o.u("f"), "system.posix_acl_access") == ACL_USER_RWX
    assert wk.run_as(USER, USER, _create(o.p("d/new"))) == "ok"
    assert os.lstat(o.u("d/new")).st_uid == USER
    assert os.getxattr(o.u("d"), "system.posix_acl_access") == ACL_USER_RWX


def test_umask_applies_without_default_acl(ovl):
    """Without a default ACL the caller's umask shapes every new object's mode -- also when
    the daemon, not the kernel, applies it (DONT_MASK) and over a whiteout (workdir path)."""
    o = ovl({"d/gone": "x", "d/gonedir/f": "y"})
    os.unlink(o.p("d/gone"))
    os.unlink(o.p("d/gonedir/f"))
    os.rmdir(o.p("d/gonedir"))
    old = os.umask(0o027)
    try:
        for name in ("new", "gone"):
            os.close(os.open(o.p(f"d/{name}"), os.O_WRONLY | os.O_CREAT, 0o666))
        for name in ("sub", "gonedir"):
            os.mkdir(o.p(f"d/{name}"), 0o777)
        os.mkfifo(o.p("d/fifo"), 0o666)
    finally:
        os.umask(old)
    for name, want in (("new", 0o640), ("gone", 0o640), ("sub", 0o750),
                       ("gonedir", 0o750), ("fifo", 0o640)):
        assert stat.S_IMODE(os.lstat(o.p(f"d/{name}")).st_mode) == want, name
        assert stat.S_IMODE(os.lstat(o.u(f"d/{name}")).st_mode) == want, name


def test_default_acl_is_inherited_by_new_files(ovl):
    """A default ACL on a lower directory applies to files created in it through the
    overlay (and the umask is then not applied)."""
    default = _posix_acl([(1, 7, 0xFFFFFFFF), (2, 6, USER), (4, 5, 0xFFFFFFFF),
                          (0x10, 7, 0xFFFFFFFF), (0x20, 5, 0xFFFFFFFF)])
    o = ovl({"d": Dir(mode=0o775, xattrs={"system.posix_acl_default": default})})
    old = os.umask(0o077)
    try:
        fd = os.open(o.p("d/new"), os.O_WRONLY | os.O_CREAT, 0o666)
        os.close(fd)
        os.mkdir(o.p("d/sub"), 0o777)
    finally:
        os.umask(old)
    acl = os.getxattr(o.p("d/new"), "system.posix_acl_access")
    assert (2).to_bytes(2, "little") + (6).to_bytes(2, "little") + USER.to_bytes(4, "little") \
        in acl, "the named-user entry was not inherited"
    assert stat.S_IMODE(os.lstat(o.p("d/new")).st_mode) == 0o664    # umask ignored
    assert os.getxattr(o.p("d/sub"), "system.posix_acl_default") == default
    assert os.getxattr(o.u("d/new"), "system.posix_acl_access") == acl


# ---------------------------------------------------------------------------------------------
# -o userxattr
# ---------------------------------------------------------------------------------------------

def test_userxattr_writes_and_reads_user_overlay_xattrs(ovl):
    o = ovl({"opq": Dir(xattrs={"user.overlay.opaque": b"y"}), "opq/top": "t",
             "d/a": "a", "d/sub/b": "b"},
            {"opq/hidden": "h", "d/a": "lower a", "d/c": "c"},
            options=("userxattr",))
    assert os.listdir(o.p("opq")) == ["top"]
    os.unlink(o.p("d/sub/b"))
    os.rmdir(o.p("d/sub"))
    assert is_whiteout(o.u("d/sub"))
    os.mkdir(o.p("d/sub"))
    assert os.getxattr(o.u("d/sub"), "user.overlay.opaque") == b"y"
    assert err(os.getxattr, o.u("d/sub"), "trusted.overlay.opaque") == "ENODATA"
    # the private xattrs are not shown through the mount
    assert not any(n.startswith("user.overlay.") for n in os.listxattr(o.p("d/sub")))
    assert not any(n.startswith("user.overlay.") for n in os.listxattr(o.p("opq")))
