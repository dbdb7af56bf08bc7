"""FUSE passthrough (passthrough=auto|on|off, overlayfs_py/passthrough.py): which opens the
kernel serves from the backing file without asking the daemon, and the overlay semantics
that must hold all the same -- a reader of a lower file moves to the upper copy, attributes
are fresh after writes through a passthrough open, O_DIRECT, files open in both ways.

The daemon runs with -d here, so its log shows every request it got: a file that passes
through must not appear in READ or WRITE requests.
"""
from __future__ import annotations

import mmap
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

import layerkit
import writekit as wk
from conftest import Stack, fuse_only

pytestmark = pytest.mark.mount

MiB = 1 << 20
DEBUG_PROG = shlex.join([sys.executable, "-m", "overlayfs_py", "-d"])


def _need_passthrough():
    fuse_only("FUSE passthrough")
    if not wk.passthrough_by_default():
        pytest.skip("no FUSE passthrough here (needs root, Linux >= 6.9 and our pyfuse3)")


@pytest.fixture
def debug_mount(make_layers, mounted):
    """(stack, mount point, FuseMount) of our daemon with -d (its log: every request)."""
    def make(*lowers, upper=True, options=()):
        stack = make_layers(*lowers, upper=True if upper else None)
        m = mounted(stack, options=options, prog=DEBUG_PROG)
        return stack, Path(m.mountpoint), m
    return make


def data_requests(log: str):
    """The READ and WRITE requests in a daemon's -d log."""
    return re.findall(r"-> (read|write)\(", log)


def test_upper_files_pass_through(debug_mount):
    """Writes, reads, mmap and O_DIRECT on upper files reach the upper file without a
    single READ or WRITE request; a lower file on a writable mount is read through the
    daemon (see the next test for why)."""
    _need_passthrough()
    stack, mnt, m = debug_mount({"lower": b"L" * MiB})
    data = os.urandom(4 * MiB)
    with open(mnt / "new", "wb") as f:
        for i in range(4):
            f.write(data[i * MiB:(i + 1) * MiB])
        f.flush()
        os.fsync(f.fileno())
    assert (mnt / "new").read_bytes() == data
    with open(mnt / "new", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        assert mm[MiB:MiB + 10] == data[MiB:MiB + 10]
        mm[0:4] = b"MMAP"
        mm.flush()
    fd = os.open(mnt / "new", os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        buf[:] = b"D" * 4096
        assert os.pwritev(fd, [buf], 8192) == 4096
        assert os.preadv(fd, [buf], 0) == 4096 and buf[:4] == b"MMAP"
    finally:
        os.close(fd)
    assert (stack.upper / "new").read_bytes()[:4] == b"MMAP"
    assert (stack.upper / "new").read_bytes()[8192:8192 + 4096] == b"D" * 4096
    assert data_requests(m.log()) == [], "data went through the daemon"
    assert (mnt / "lower").read_bytes() == b"L" * MiB
    assert "read" in data_requests(m.log()), "a lower file of a writable mount passed through"


@pytest.fixture
def ro_bind(tmp_path):
    """ro_bind(dir) -> a read-only bind mount of dir (unmounted afterwards)."""
    made = []

    def make(src):
        dst = tmp_path / f"ro{len(made)}"
        dst.mkdir()
        subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
        made.append(dst)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(dst)], check=True)
        return dst
    try:
        yield make
    finally:
        for d in reversed(made):
            if subprocess.run(["umount", str(d)]).returncode != 0:
                subprocess.run(["umount", "-l", str(d)])


def test_lower_files_pass_through_where_their_atime_cannot_change(make_layers, mounted,
                                                                  ro_bind):
    """A mount without upper layer passes lower files through only where reading them
    cannot change their atime (the kernel opens the backing file with the reader's flags,
    and the kernel overlay never touches a lower file's atime): on a read-only (or
    noatime) mount of the layer, not on this machine's relatime /tmp."""
    _need_passthrough()
    stack = make_layers({"f": b"x" * (2 * MiB)})
    for lower, passes in ((stack.lowers[0], False), (ro_bind(stack.lowers[0]), True)):
        s = Stack(stack.root, [lower], None, None, stack.root / f"m{passes}")
        s.mnt.mkdir()
        m = mounted(s, prog=DEBUG_PROG)
        mnt = Path(m.mountpoint)
        atime = os.stat(stack.lowers[0] / "f").st_atime_ns
        assert (mnt / "f").read_bytes() == b"x" * (2 * MiB)
        with open(mnt / "f", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
            assert mm[-1:] == b"x"
        assert (data_requests(m.log()) == []) == passes, (lower, data_requests(m.log()))
        assert os.stat(stack.lowers[0] / "f").st_atime_ns == atime


def test_upper_reads_pass_through_only_with_the_upper_atime_rule(make_layers, mounted):
    """noatime on our mount, relatime on the upper's file system: a read through a
    passthrough open would set the upper file's atime, so readers go through the daemon;
    write-only opens still pass through."""
    _need_passthrough()
    stack = make_layers({}, upper=True)
    m = mounted(stack, options=("noatime",), prog=DEBUG_PROG)
    mnt = Path(m.mountpoint)
    with open(mnt / "f", "wb") as f:
        f.write(b"w" * MiB)
    assert data_requests(m.log()) == [], "a write-only open did not pass through"
    os.utime(stack.upper / "f", ns=(1_000_000_000, 2_000_000_000))
    assert (mnt / "f").read_bytes() == b"w" * MiB
    assert "read" in data_requests(m.log())
    assert os.stat(stack.upper / "f").st_atime_ns == 1_000_000_000


@pytest.mark.parametrize("how", ["write", "truncate", "append-mmap"])
def test_lower_reader_moves_to_the_copy(ovl_pair, how):
    """A process has a lower file open read-only; another opens it for writing (copy-up)
    and changes it. As on the kernel overlay (since 4.19), the reader sees the new data:
    its open was left on the daemon's path, which moves it to the copy. The writer's open
    is not passed through while the reader is open (one io mode per inode), and new opens
    after both closed are."""
    for side, root in ovl_pair({"f": b"old data\n" * 1000}):
        r = os.open(root / "f", os.O_RDONLY)
        try:
            assert os.pread(r, 8, 0) == b"old data"
            w = os.open(root / "f", os.O_RDWR)
            try:
                if how == "write":
                    os.pwrite(w, b"NEW", 0)
                elif how == "truncate":
                    os.ftruncate(w, 4)
                    os.pwrite(w, b"NEW!", 0)
                else:
                    with mmap.mmap(w, 0) as mm:
                        mm[0:3] = b"NEW"
                        mm.flush()
                assert os.pread(r, 4, 0)[:3] == b"NEW", side
            finally:
                os.close(w)
            assert os.pread(r, 4, 0)[:3] == b"NEW", side
            assert os.fstat(r).st_size == (4 if how == "truncate" else 9000), side
        finally:
            os.close(r)
        assert (root / "f").read_bytes()[:3] == b"NEW"


@pytest.fixture
def ovl_pair(make_layers, mounted, kernel_mount):
    """Yields (side, mount point) for ours and for the kernel overlay over the same layers."""
    def make(spec, options=()):
        stack = make_layers(spec, upper=True)
        kern = kernel_mount(stack)
        ours = Path(wk.mp(mounted(stack, options=options)))
        return [("ours", ours), ("kernel", kern)]
    return make


def _attrs(st):
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_blocks > 0)


def test_attributes_fresh_after_passthrough_writes(make_layers, mounted):
    """Size and times seen through the mount (stat, fstat, statx) are the upper file's
    after writes through a passthrough open: write(2), pwrite past the end, a write
    through a shared mapping, ftruncate, fallocate -- while the file is open and after."""
    stack = make_layers({"lower": "x"}, upper=True)
    mnt = Path(wk.mp(mounted(stack)))
    up = stack.upper / "f"
    fd = os.open(mnt / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        def same(what):
            ours = (os.stat(mnt / "f"), os.fstat(fd))
            real = os.stat(up)
            for st in ours:
                assert _attrs(st) == _attrs(real), f"{what}: {_attrs(st)} != {_attrs(real)}"
        os.write(fd, b"a" * 1000)
        same("write")
        time.sleep(0.01)
        os.pwrite(fd, b"b", 5 * MiB)
        same("pwrite past the end")
        time.sleep(0.01)
        with mmap.mmap(fd, 0) as mm:
            mm[10:20] = b"c" * 10
            mm.flush()
        same("mmap write + msync")
        os.ftruncate(fd, 3000)
        same("ftruncate")
        os.posix_fallocate(fd, 0, 2 * MiB)
        same("fallocate")
    finally:
        os.close(fd)
    same_after = (os.stat(mnt / "f"), os.stat(up))
    assert _attrs(same_after[0]) == _attrs(same_after[1])
    r = subprocess.run(["stat", "-c", "%s %Y", str(mnt / "f")], capture_output=True, text=True,
                       check=True).stdout.split()
    assert int(r[0]) == os.stat(up).st_size and int(r[1]) == int(os.stat(up).st_mtime)


def test_writer_open_next_to_a_cached_reader(make_layers, mounted):
    """An inode has one io mode at a time: with a cached open on it (a lower file read on a
    writable mount), a writer's open is cached too, not refused (the kernel would answer a
    passthrough open there with EIO)."""
    stack = make_layers({"f": b"1" * 8192}, upper=True)
    mnt = Path(wk.mp(mounted(stack)))
    r = os.open(mnt / "f", os.O_RDONLY)
    try:
        w1 = os.open(mnt / "f", os.O_WRONLY)
        w2 = os.open(mnt / "f", os.O_RDWR)
        os.pwrite(w1, b"2" * 10, 0)
        os.pwrite(w2, b"3" * 5, 0)
        for fd in (w1, w2):
            os.close(fd)
        assert os.pread(r, 12, 0) == b"33333" + b"2" * 5 + b"11"
    finally:
        os.close(r)
    # once that reader is gone, new opens pass through and see the same data
    with open(mnt / "f", "r+b") as f:
        assert f.read(12) == b"33333" + b"2" * 5 + b"11"
        f.seek(0)
        f.write(b"4")
    assert (stack.upper / "f").read_bytes()[:2] == b"43"


def test_o_direct_through_passthrough(make_layers, mounted):
    """O_DIRECT on a new and on a copied-up file goes to the upper file directly; the
    upper file system decides alignment (misaligned: EINVAL, as under the kernel overlay)."""
    stack = make_layers({"low": os.urandom(64 * 1024)}, upper=True)
    mnt = Path(wk.mp(mounted(stack)))
    buf = mmap.mmap(-1, 8192)
    buf[:] = os.urandom(8192)
    for name, flags in (("new", os.O_CREAT), ("low", 0)):
        fd = os.open(mnt / name, os.O_RDWR | os.O_DIRECT | flags, 0o644)
        try:
            assert os.pwritev(fd, [buf], 4096) == 8192
            back = mmap.mmap(-1, 8192)
            assert os.preadv(fd, [back], 4096) == 8192 and back[:] == buf[:]
            assert wk.outcome(wk.attempt(os.pwrite, fd, b"x" * 100, 1)) == "EINVAL"
        finally:
            os.close(fd)
        assert (stack.upper / name).read_bytes()[4096:12288] == buf[:]


def test_passthrough_option(make_layers, mounted, tmp_path):
    stack = make_layers({"f": "x"}, upper=True)
    opts = f"lowerdir={stack.lowers[0]},upperdir={stack.upper},workdir={stack.work}"

    def run(*args, wrapper=()):
        cmd = [*wrapper, sys.executable, "-m", "overlayfs_py", "-o", ",".join((opts,) + args),
               str(stack.mnt)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
    r = run("passthrough=sometimes")
    assert r.returncode == 1 and "passthrough" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run("passthrough=on", "writeback=1")
    assert r.returncode == 1 and "writeback=1" in r.stderr, r.stderr
    assert not layerkit.is_mounted(stack.mnt)
    # without CAP_SYS_ADMIN (what a non-root daemon lacks) passthrough=on fails the mount
    # with one line; setpriv drops the capability from a root process
    r = run("passthrough=on", wrapper=("setpriv", "--bounding-set", "-sys_admin",
                                       "--inh-caps", "-sys_admin", "--"))
    assert r.returncode == 1 and "CAP_SYS_ADMIN" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not layerkit.is_mounted(stack.mnt)
    if wk.passthrough_by_default():
        m = mounted(stack, options=("passthrough=on",))
        assert (Path(wk.mp(m)) / "f").read_bytes() == b"x"


# struct vfs_cap_data, revision 2, effective, permitted = CAP_NET_RAW
CAP_NET_RAW = bytes.fromhex("01000002") + (1 << 13).to_bytes(4, "little") + bytes(12)


def test_capability_seen_after_writes_remembered_none(ovl_pair):
    """Writes make the kernel ask for security.capability each time, and the daemon
    remembers that a file has none; a capability set later through the mount is seen,
    and the next write drops it again -- as on the kernel overlay."""
    res = {}
    for side, root in ovl_pair({"bin/tool": layerkit.File(b"\x7fELF", mode=0o755)}):
        p = root / "bin/tool"
        with open(p, "r+b") as f:
            for _ in range(3):
                f.write(b"x")
                f.flush()
        got = [wk.attempt(os.getxattr, p, "security.capability")]
        os.setxattr(p, "security.capability", CAP_NET_RAW)
        got.append(wk.attempt(os.getxattr, p, "security.capability"))
        with open(p, "ab") as f:
            f.write(b"y")
        got.append(wk.attempt(os.getxattr, p, "security.capability"))
        res[side] = got
    assert res["ours"] == res["kernel"] == [("err", "ENODATA"), ("ok", CAP_NET_RAW),
                                            ("err", "ENODATA")], res
