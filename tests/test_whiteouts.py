"""Whiteout creation without a mount: the shared workdir whiteout and its limits.

Every whiteout is a hard link of one 0/0 device in ``workdir/work`` (as the kernel's since
Linux 5.8). These tests drive ``Namespace.whiteout`` on plain directories.
"""
from __future__ import annotations

import errno
import os

import pytest

import writekit as wk
from overlayfs_py.copyup import Workdir
from overlayfs_py.dirops import Namespace

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a 0/0 device needs root")


@pytest.fixture
def ns(tmp_path):
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    work = Workdir(str(tmp_path / "work"))
    n = Namespace(None, work, None)
    fd = os.open(tmp_path / "upper", os.O_RDONLY | os.O_DIRECTORY)
    yield n, fd, tmp_path
    os.close(fd)
    n.close()
    work.close()


def test_whiteouts_over_nothing_a_file_and_a_dir_share_one_inode(ns):
    n, fd, root = ns
    (root / "upper/file").write_text("x")
    (root / "upper/dir").mkdir()
    (root / "upper/dir/inner").write_text("y")
    n.whiteout(fd, b"new", None)
    n.whiteout(fd, b"file", os.lstat(root / "upper/file"))
    n.whiteout(fd, b"dir", os.lstat(root / "upper/dir"))
    names = ("new", "file", "dir")
    assert all(wk.is_whiteout(root / "upper" / name) for name in names)
    sts = [os.lstat(root / "upper" / name) for name in names]
    assert len({st.st_ino for st in sts}) == 1
    # the workdir holds the template only: the replaced directory tree is gone
    assert len(os.listdir(root / "work/work")) == 1


def test_template_at_its_link_limit_is_replaced(ns, monkeypatch):
    """EMLINK (ext4 stops at 65000 links) starts a new template; whiteouts already made
    keep theirs, and only one template stays in the workdir."""
    n, fd, root = ns
    n.whiteout(fd, b"a", None)
    real_link = os.link
    calls = []

    def full_once(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OSError(errno.EMLINK, "Too many links")
        return real_link(*args, **kwargs)

    monkeypatch.setattr(os, "link", full_once)
    n.whiteout(fd, b"b", None)
    monkeypatch.setattr(os, "link", real_link)
    assert wk.is_whiteout(root / "upper/a") and wk.is_whiteout(root / "upper/b")
    a, b = os.lstat(root / "upper/a"), os.lstat(root / "upper/b")
    assert a.st_ino != b.st_ino
    left = os.listdir(root / "work/work")
    assert len(left) == 1 and os.lstat(root / "work/work" / left[0]).st_ino == b.st_ino


def test_template_removed_at_close(ns):
    n, fd, root = ns
    n.whiteout(fd, b"a", None)
    assert len(os.listdir(root / "work/work")) == 1
    n.close()
    assert os.listdir(root / "work/work") == []
    assert wk.is_whiteout(root / "upper/a")


def test_other_link_errors_are_not_swallowed(ns, monkeypatch):
    n, fd, root = ns

    def refuse(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    with pytest.raises(OSError) as e:
        n.whiteout(fd, b"a", None)
    assert e.value.errno == errno.EPERM
    assert not os.path.lexists(root / "upper/a")
