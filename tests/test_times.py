"""Times as the kernel overlay keeps them.

- ctime and mtime: what stat shows through the mount is what the upper file holds after an
  unmount, what we show after mounting again, and what the kernel overlay shows on the
  same upper. With the writeback cache the kernel keeps its own ctime for a regular file,
  which the upper file cannot be given: with exact_ctime=1 the daemon has the kernel drop
  such an inode once it changed (ops._reload_ctime).
- atime: a read updates the atime of an upper file as the mount's relatime (default),
  strictatime or noatime says, never a lower file's (not even in its layer), and nothing
  on a read-only mount; differential against the kernel overlay.
"""
from __future__ import annotations

import contextlib
import os
import time

import pytest

import layerkit
import writekit as wk
from layerkit import File

pytestmark = [pytest.mark.mount]

OLD = 1_000_000_000


def _times(path):
    st = os.lstat(path)
    return st.st_mtime_ns, st.st_ctime_ns


def _append(p):
    with open(p, "ab") as f:
        f.write(b"more\n")


def _create(p):
    with open(p, "wb") as f:
        f.write(b"x" * 10000)


def _open_rdwr(p):
    os.close(os.open(p, os.O_RDWR))


STEPS = [
    ("append", "f", _append),
    ("append twice", "f2", lambda p: (_append(p), _append(p))),
    ("create and write", "new", _create),
    ("chmod", "g", lambda p: os.chmod(p, 0o600)),
    ("chown", "g2", lambda p: os.chown(p, 1000, 1000)),
    ("open O_RDWR (copy-up)", "h", _open_rdwr),
    ("utime", "k", lambda p: os.utime(p, ns=(1, 2))),
    ("truncate", "t", lambda p: os.truncate(p, 1)),
    ("setxattr", "x", lambda p: os.setxattr(p, "user.k", b"v")),
    ("write, keep open, chmod", "w", None),
]
# link and rename are answered while the kernel holds the directory: the kernel drops its
# own ctime a few milliseconds after the call returns
SETTLED = [
    ("link", "i", lambda p: os.link(p, p + "2")),
    ("rename", "j", lambda p: os.rename(p, p + "2")),
]


def _lowers():
    return {n: File("x\n", mtime=OLD) for n in
            ("f", "f2", "g", "g2", "h", "i", "j", "k", "t", "w", "x")}


def _ours(stack, opts):
    return layerkit.fuse_mount(None, stack.lowers, stack.upper, stack.work, stack.mnt, opts)


@pytest.mark.parametrize("opts", [("writeback=0",), ("writeback=1", "exact_ctime=1")],
                         ids=["writeback=0", "exact_ctime"])
def test_ctime_mtime_survive_unmount_and_match_the_kernel(make_layers, opts):
    """Every change of STEPS, then stat; unmount; the upper file, our remount and the
    kernel overlay on the same upper all show those times. (With the writeback cache and
    without exact_ctime=1 the kernel's own ctime shows until it forgets the file: README.)"""
    if wk.kernel_mode() or not wk.fuse_available():
        pytest.skip("needs our daemon, /dev/fuse and fusermount3")
    stack = make_layers(_lowers(), upper=True)
    shown = {}
    with _ours(stack, opts) as m:
        mnt = m.mountpoint
        for what, rel, fn in STEPS:
            p = os.path.join(mnt, rel)
            if fn is None:                   # an fd kept open over a chmod and a close
                fd = os.open(p, os.O_WRONLY | os.O_APPEND)
                os.write(fd, b"open\n")
                os.chmod(p, 0o640)
                os.close(fd)
            else:
                fn(p)
            shown[what, rel] = _times(p)
        for what, rel, fn in SETTLED:
            fn(os.path.join(mnt, rel))
        time.sleep(0.2)
        for what, rel, fn in SETTLED:
            for name in (rel, rel + "2"):
                if os.path.lexists(os.path.join(mnt, name)):
                    shown[what, name] = _times(os.path.join(mnt, name))
        # and the mount does not change its mind later
        assert {k: _times(os.path.join(mnt, k[1])) for k in shown} == shown
    for (what, rel), t in shown.items():
        assert _times(os.path.join(stack.upper, rel)) == t, f"{what}: upper after unmount"
    with _ours(stack, opts) as m:
        for (what, rel), t in shown.items():
            assert _times(os.path.join(m.mountpoint, rel)) == t, f"{what}: after remount"
    if not wk.kernel_overlay_available():
        return
    kwork = stack.root / "kwork"
    kwork.mkdir()
    with layerkit.kernel_overlay(stack.lowers, stack.upper, kwork, mnt=stack.mnt,
                                 options=wk.KERNEL_OPTS) as kmnt:
        for (what, rel), t in shown.items():
            assert _times(os.path.join(kmnt, rel)) == t, f"{what}: the kernel overlay"


# ------------------------------------------------------------------------------------------
# atime

HOUR_NS = 3600 * 10**9


def _atime_layers(root):
    """A lower file and two upper files: one whose atime is older than its mtime (a read
    is due under relatime), one whose atime is newer than its mtime and ctime (not due)."""
    root.mkdir()
    low, up, work, mnt = (root / n for n in ("lower", "upper", "work", "mnt"))
    for d in (low, up, work, mnt):
        d.mkdir()
    (low / "low").write_bytes(b"low\n")
    os.utime(low / "low", ns=(OLD, OLD))
    (up / "up_old").write_bytes(b"up\n")
    os.utime(up / "up_old", ns=(OLD, time.time_ns()))
    (up / "up_new").write_bytes(b"up\n")
    now = time.time_ns()
    os.utime(up / "up_new", ns=(now + HOUR_NS, now - HOUR_NS))
    return low, up, work, mnt


def _atime_probe(mnt, up, low):
    def read(p):
        with open(p, "rb") as f:
            f.read()

    def a(p):
        return os.stat(p).st_atime_ns
    out = {}
    for name, p in (("upper, atime < mtime", mnt / "up_old"),
                    ("upper, atime > mtime and ctime", mnt / "up_new"),
                    ("lower", mnt / "low")):
        before = a(p)
        read(p)
        out[name] = a(p) != before
        if name.startswith("upper"):
            before = a(p)
            time.sleep(0.02)
            read(p)
            out[name + ", second read"] = a(p) != before
    out["lower file in its layer"] = a(low / "low") != OLD
    out["shown == upper file"] = all(a(mnt / n) == a(up / n) for n in ("up_old", "up_new"))
    return out


@pytest.mark.parametrize("mode", ["relatime", "noatime", "strictatime", "ro", "default"])
def test_atime_on_read_as_the_kernel_overlay(tmp_path, mode):
    if wk.kernel_mode() or not (wk.fuse_available() and wk.kernel_overlay_available()):
        pytest.skip("needs our daemon, /dev/fuse and the kernel overlay as root")
    opts = () if mode == "default" else (mode,)
    results = {}
    for side in ("ours", "kernel"):
        low, up, work, mnt = _atime_layers(tmp_path / side)
        if side == "ours":
            cm = layerkit.fuse_mount(None, [low], up, work, mnt, opts)
        else:
            cm = layerkit.kernel_overlay([low], up, work, mnt=mnt, options=opts)
        with cm:
            results[side] = _atime_probe(mnt, up, low)
    assert results["ours"] == results["kernel"]
    if mode in ("noatime", "ro"):
        assert not any(v for k, v in results["ours"].items() if not k.startswith("shown"))
    else:
        assert results["ours"]["upper, atime < mtime"]
    assert not results["ours"]["lower file in its layer"]


@pytest.mark.parametrize("opts, want", [
    ("", "relatime"), ("relatime", "relatime"), ("noatime", "noatime"),
    ("strictatime", "strictatime"), ("noatime,strictatime", "strictatime"),
    ("strictatime,noatime", "strictatime"), ("noatime,atime", "relatime"),
    ("strictatime,nostrictatime", "relatime"), ("norelatime", "relatime"),
])
def test_atime_options(tmp_path, opts, want):
    """The kernel's precedence (do_new_mount): strictatime beats noatime beats relatime."""
    from overlayfs_py.config import parse_argv
    for d in ("l", "m"):
        (tmp_path / d).mkdir()
    o = f"lowerdir={tmp_path / 'l'}" + ("," + opts if opts else "")
    assert parse_argv(["-o", o, str(tmp_path / "m")], check=False).atime == want
