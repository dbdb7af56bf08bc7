"""fallocate, SEEK_DATA/SEEK_HOLE, copy_file_range and O_TMPFILE through the mount
(vendor/pyfuse3 patches 0007-0010), each against the kernel overlay on a copy of the same
stack: same results and errnos, same data and holes, same upper layer.

Where FUSE itself cannot do what the kernel overlay does (it has no FICLONE and forwards
only some fallocate modes), the test says so and checks the FUSE behaviour instead.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import layerkit
import writekit as wk
from conftest import Stack, kernel_mode

pytestmark = pytest.mark.mount

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_libc.linkat.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_int)
AT_EMPTY_PATH = 0x1000
KEEP_SIZE, PUNCH_HOLE, COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE = 0x01, 0x02, 0x08, 0x10, 0x20
MiB = 1 << 20


def _ename(code: int) -> str:
    return "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode[code]


def fallocate(fd, mode, off, length) -> str:
    if _libc.fallocate(fd, mode, off, length) == 0:
        return "ok"
    return _ename(ctypes.get_errno())


def link_fd(fd, dir_fd, name) -> str:
    """linkat(fd, "", dir_fd, name, AT_EMPTY_PATH): name an O_TMPFILE file."""
    if _libc.linkat(fd, b"", dir_fd, os.fsencode(name), AT_EMPTY_PATH) == 0:
        return "ok"
    return _ename(ctypes.get_errno())


def extent_map(fd, size):
    """[(start, end)] of the data extents, from SEEK_DATA/SEEK_HOLE."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            assert e.errno == errno.ENXIO
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def seek_results(fd, offsets):
    res = []
    for off in offsets:
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            res.append(wk.attempt(os.lseek, fd, off, whence))
    return res


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_sparse(path, pieces, size):
    """A file of ``size`` bytes with data only at (offset, bytes) ``pieces``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off, data in pieces:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


class Pair:
    """Our mount and the kernel overlay over copies of the same layers: ``ours``/``kern``
    are the mount points, ``up``/``kup`` the upper dirs, ``lower`` our top lower layer."""

    def __init__(self, stack, m, kern):
        self.stack, self.ours, self.kern = stack, Path(wk.mp(m)), Path(kern)
        self.up, self.kup = wk.upper_of(stack, m), self.kern.parent / "upper"
        self.lower = stack.lowers[0]

    def sides(self):
        return (("ours", self.ours), ("kernel", self.kern))

    def uppers_equal(self):
        kroot = self.kern.parent
        diffs, _ = wk.compare_uppers(self.kup, self.up, sorted(kroot.glob("lower*")))
        assert not diffs, "upper layers differ:\n  " + "\n  ".join(diffs)


@pytest.fixture
def pair(make_layers, mounted, kernel_mount):
    def make(*lowers, options=(), prepare=None) -> Pair:
        stack = make_layers(*lowers, upper=True)
        if prepare is not None:
            prepare(stack)
        kern = kernel_mount(stack)
        m = mounted(stack, options=() if kernel_mode() else options)
        return Pair(stack, m, kern)
    return make


# ---------------------------------------------------------------------------------------------
# fallocate
# ---------------------------------------------------------------------------------------------

FALLOC_STEPS = [
    ("preallocate past the end", 0, 8192, 2 * MiB),
    ("keep size", KEEP_SIZE, 2 * MiB, MiB),
    ("punch a hole", PUNCH_HOLE | KEEP_SIZE, 4096, 8192),
    ("zero a range", ZERO_RANGE, 20000, 5000),
    ("zero past the end, keep size", ZERO_RANGE | KEEP_SIZE, 2 * MiB, 4096),
    ("punch without keep size", PUNCH_HOLE, 0, 4096),        # EINVAL, as on any fs
]


def test_fallocate_matches_kernel(pair):
    def prepare(stack):
        (stack.lowers[0] / "f").write_bytes(bytes(range(256)) * 200)    # 51200 bytes
    P = pair({"keep": "k"}, prepare=prepare)
    for _, root in P.sides():
        # a read-only fd cannot fallocate, and nothing is copied up for trying
        fd = os.open(root / "f", os.O_RDONLY)
        try:
            assert fallocate(fd, 0, 0, 4096) == "EBADF"
        finally:
            os.close(fd)
    assert not (P.up / "f").exists()
    fds = {name: os.open(root / "f", os.O_RDWR) for name, root in P.sides()}
    try:
        for what, mode, off, length in FALLOC_STEPS:
            r = {n: fallocate(fd, mode, off, length) for n, fd in fds.items()}
            assert r["ours"] == r["kernel"], f"{what}: {r}"
            st = {n: os.fstat(fd) for n, fd in fds.items()}
            assert st["ours"].st_size == st["kernel"].st_size, what
            assert (st["ours"].st_blocks > 0) == (st["kernel"].st_blocks > 0), what
            data = {n: os.pread(fd, 3 * MiB, 0) for n, fd in fds.items()}
            assert data["ours"] == data["kernel"], what
            size = st["ours"].st_size
            maps = {n: extent_map(fd, size) for n, fd in fds.items()}
            assert maps["ours"] == maps["kernel"], f"{what}: {maps}"
        # the punched range is a hole in the upper file itself
        m = extent_map(fds["ours"], 4096 * 4)
        assert m[0] == (0, 4096) and m[1][0] == 3 * 4096, m
    finally:
        for fd in fds.values():
            os.close(fd)
    assert sha(P.up / "f") == sha(P.kup / "f")
    P.uppers_equal()


def test_fallocate_collapse_and_insert_range(pair):
    """The kernel overlay passes every mode to the upper file. FUSE forwards only
    KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE (fs/fuse/file.c, fuse_file_fallocate) and answers
    COLLAPSE_RANGE and INSERT_RANGE with EOPNOTSUPP itself, before asking the daemon: a
    divergence no daemon can remove (README: known divergences)."""
    def prepare(stack):
        (stack.lowers[0] / "f").write_bytes(b"a" * 4096 + b"b" * 4096 + b"c" * 4096)
    P = pair({}, prepare=prepare)
    fd = os.open(P.kern / "f", os.O_RDWR)
    try:
        assert fallocate(fd, COLLAPSE_RANGE, 4096, 4096) == "ok"
        assert os.pread(fd, 10000, 0) == b"a" * 4096 + b"c" * 4096
        assert fallocate(fd, INSERT_RANGE, 0, 4096) == "ok"
    finally:
        os.close(fd)
    fd = os.open(P.ours / "f", os.O_RDWR)
    try:
        want = "ok" if kernel_mode() else "EOPNOTSUPP"
        assert fallocate(fd, COLLAPSE_RANGE, 4096, 4096) == want
        assert fallocate(fd, INSERT_RANGE, 0, 4096) == want
        if not kernel_mode():
            assert os.pread(fd, 20000, 0) == b"a" * 4096 + b"b" * 4096 + b"c" * 4096
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# SEEK_DATA / SEEK_HOLE
# ---------------------------------------------------------------------------------------------

SPARSE_PIECES = [(0, b"head"), (MiB, b"x" * 10000), (3 * MiB + 100, b"tail")]
SPARSE_SIZE = 4 * MiB
OFFSETS = [0, 5, 4096, MiB - 1, MiB, MiB + 9999, 2 * MiB, 3 * MiB, 3 * MiB + 200,
           SPARSE_SIZE - 1, SPARSE_SIZE, SPARSE_SIZE + 1]


@pytest.mark.parametrize("options", [(), ("writeback=0",)], ids=["writeback", "no-writeback"])
def test_seek_data_hole_match_kernel(pair, tmp_path, options):
    """Lower, copied-up and new upper sparse files show the same data and holes as on the
    kernel overlay; written data still in the writeback cache counts as data."""
    def prepare(stack):
        make_sparse(stack.lowers[0] / "lower.img", SPARSE_PIECES, SPARSE_SIZE)
        make_sparse(stack.lowers[0] / "copied.img", SPARSE_PIECES, SPARSE_SIZE)
    P = pair({}, prepare=prepare, options=options)
    res = {}
    for side, root in P.sides():
        fd = os.open(root / "lower.img", os.O_RDONLY)
        try:
            res[side] = (seek_results(fd, OFFSETS), extent_map(fd, SPARSE_SIZE))
        finally:
            os.close(fd)
    assert res["ours"] == res["kernel"]
    assert len(res["ours"][1]) == 3, res["ours"][1]
    # copied up: the kernel copies in 1 MiB chunks (data within a chunk becomes dense),
    # we copy data extents only: ours is at least as sparse, with the same contents
    maps = {}
    for side, root in P.sides():
        fd = os.open(root / "copied.img", os.O_RDWR)
        try:
            maps[side] = extent_map(fd, SPARSE_SIZE)
            assert os.pread(fd, SPARSE_SIZE, 0) == \
                (P.lower / "copied.img").read_bytes(), side
        finally:
            os.close(fd)
    for start, end in maps["ours"]:
        assert any(s <= start and end <= e for s, e in maps["kernel"]), maps
    assert len(maps["ours"]) >= 2, maps
    # a file written through the mount, asked while the data may still be in the cache
    res = {}
    for side, root in P.sides():
        fd = os.open(root / "new.img", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"a", MiB)
            os.pwrite(fd, b"b" * 5000, 3 * MiB)
            res[side] = (seek_results(fd, OFFSETS), extent_map(fd, os.fstat(fd).st_size))
        finally:
            os.close(fd)
    assert res["ours"] == res["kernel"]
    # sparse files stay sparse when copied out of the mount
    out = tmp_path / "out.img"
    subprocess.run(["cp", "--sparse=auto", str(P.ours / "lower.img"), str(out)], check=True)
    assert out.read_bytes() == (P.lower / "lower.img").read_bytes()
    assert os.stat(out).st_blocks * 512 < MiB, "cp filled the holes"


# ---------------------------------------------------------------------------------------------
# copy_file_range
# ---------------------------------------------------------------------------------------------

def test_copy_file_range_matches_kernel(pair):
    def prepare(stack):
        (stack.lowers[0] / "src").write_bytes(os.urandom(3 * MiB + 123))
        (stack.lowers[0] / "dst").write_bytes(b"lower dst " * 1000)
    P = pair({}, prepare=prepare)
    for _, root in P.sides():
        src = os.open(root / "src", os.O_RDONLY)
        new = os.open(root / "new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        dst = os.open(root / "dst", os.O_RDWR)
        try:
            n = 0
            while n < 3 * MiB + 123:
                got = os.copy_file_range(src, new, 1 << 30, n, n)
                assert got > 0
                n += got
            assert os.copy_file_range(src, dst, 5000, 100, 2000) == 5000
            assert os.copy_file_range(src, dst, 100, 3 * MiB + 100, 12000) == 23
            assert os.copy_file_range(src, dst, 100, 4 * MiB, 0) == 0      # past the end
            ro = os.open(root / "src", os.O_RDONLY)
            try:
                assert wk.outcome(wk.attempt(os.copy_file_range, src, ro, 10)) == "EBADF"
            finally:
                os.close(ro)
        finally:
            for fd in (src, new, dst):
                os.close(fd)
    for name in ("new", "dst"):
        assert sha(P.ours / name) == sha(P.kern / name), name
    assert sha(P.ours / "new") == sha(P.lower / "src")
    P.uppers_equal()
    # shutil.copyfile and cp --reflink=auto give the same copies
    for _, root in P.sides():
        shutil.copyfile(root / "src", root / "by-shutil")
        subprocess.run(["cp", "--reflink=auto", str(root / "src"), str(root / "by-cp")],
                       check=True)
    for name in ("by-shutil", "by-cp"):
        assert sha(P.ours / name) == sha(P.lower / "src"), name
    P.uppers_equal()


def _shared_extents(path) -> bool:
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return "shared" in out


@pytest.fixture
def xfs_dir(tmp_path):
    """An xfs file system with reflinks on a loop device, unmounted and detached after."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a loop device")
    if not shutil.which("mkfs.xfs"):
        pytest.skip("mkfs.xfs not installed (xfsprogs; make setup installs it)")
    img = tmp_path / "xfs.img"
    with open(img, "wb") as f:
        f.truncate(512 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    mnt = tmp_path / "xfs"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "xfs", dev, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", str(mnt)]).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)])
    finally:
        subprocess.run(["losetup", "-d", dev])
        img.unlink()


def test_copy_file_range_reflinks_on_xfs(xfs_dir, mounted, kernel_mount):
    """On an upper layer with reflinks, cp --reflink=auto and copy_file_range inside the
    mount share extents instead of copying, as on the kernel overlay. cp --reflink=always
    needs FICLONE, which FUSE does not forward (no remap_file_range): it fails there."""
    lower = xfs_dir / "lower0"
    lower.mkdir()
    (lower / "big").write_bytes(os.urandom(16 * MiB))
    stacks = []
    for name in ("ours", "kernel"):
        root = xfs_dir / name
        dirs = [root / n for n in ("upper", "work", "mnt")]
        for d in dirs:
            d.mkdir(parents=True)
        stacks.append(Stack(root, [lower], *dirs))
    kern = kernel_mount(stacks[1], convert=False) if not kernel_mode() else None
    m = mounted(stacks[0])
    ours, upper = Path(wk.mp(m)), wk.upper_of(stacks[0], m)
    for side, top in (("ours", ours), ("kernel", kern)):
        if top is None:
            continue
        # a copy in the upper layer first (copy-up of the lower file), then copies of it
        with open(top / "big", "r+b") as f:
            f.write(b"!")
        subprocess.run(["cp", "--reflink=auto", str(top / "big"), str(top / "cp-auto")],
                       check=True)
        src = os.open(top / "big", os.O_RDONLY)
        dst = os.open(top / "cfr", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert os.copy_file_range(src, dst, 16 * MiB) == 16 * MiB
        finally:
            os.close(src)
            os.close(dst)
        r = subprocess.run(["cp", "--reflink=always", str(top / "big"), str(top / "cp-always")],
                           capture_output=True, text=True)
        if side == "kernel" or kernel_mode():
            assert r.returncode == 0, r.stderr
        else:
            assert r.returncode != 0 and "Operation not supported" in r.stderr, r.stderr
    up = {"ours": upper, "kernel": stacks[1].upper if kern else None}
    for side, u in up.items():
        if u is None:
            continue
        for name in ("cp-auto", "cfr"):
            assert sha(u / name) == sha(u / "big"), (side, name)
            assert _shared_extents(u / name), f"{side}: {name} was copied, not reflinked"


# ---------------------------------------------------------------------------------------------
# O_TMPFILE
# ---------------------------------------------------------------------------------------------

def test_o_tmpfile_and_linkat_match_kernel(pair):
    P = pair({"d/a": "a\n", "d/gone": "lower gone\n", "keep": "k"})
    for _, root in P.sides():
        os.unlink(root / "d/gone")                        # a whiteout to link over
        dfd = os.open(root / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fd = os.open(root / "d", os.O_TMPFILE | os.O_RDWR, 0o640)
            try:
                os.write(fd, b"tmp data")
                st = os.fstat(fd)
                assert st.st_nlink == 0 and st.st_size == 8
                assert sorted(os.listdir(root / "d")) == ["a"]
                assert link_fd(fd, dfd, "named") == "ok"
                assert link_fd(fd, dfd, "gone") == "ok"          # over the whiteout
                assert link_fd(fd, dfd, "a") == "EEXIST"
                assert os.fstat(fd).st_nlink == 2
                os.write(fd, b"+")
            finally:
                os.close(fd)
            # O_EXCL: never linkable
            fd = os.open(root / "d", os.O_TMPFILE | os.O_WRONLY | os.O_EXCL, 0o600)
            try:
                assert link_fd(fd, dfd, "excl") == "ENOENT"
            finally:
                os.close(fd)
            # unlinked again before close: gone for good
            fd = os.open(root / "d", os.O_TMPFILE | os.O_RDWR, 0o600)
            try:
                assert link_fd(fd, dfd, "brief") == "ok"
                os.unlink(root / "d/brief")
                assert os.fstat(fd).st_nlink == 0
            finally:
                os.close(fd)
        finally:
            os.close(dfd)
        assert (root / "d/named").read_bytes() == b"tmp data+"
        assert (root / "d/gone").read_bytes() == b"tmp data+"
        assert sorted(os.listdir(root / "d")) == ["a", "gone", "named"]
    so, sk = wk.merged_snapshot(P.ours), wk.merged_snapshot(P.kern)
    diff = wk.diff_snapshots(sk, so, "kernel", "ours")
    assert not diff, "\n".join(diff)
    P.uppers_equal()


def test_o_tmpfile_owner_and_umask_as_caller(pair):
    """An unprivileged caller's O_TMPFILE file is owned by it and gets its umask, as a
    created file (the kernel overlay makes it with the caller's fsuid/fsgid)."""
    P = pair({"pub": layerkit.Dir(mode=0o1777)})
    wk.make_traversable(P.ours.parent)
    wk.make_traversable(P.kern.parent)
    res = {}
    for side, root in P.sides():
        def make(path=root / "pub"):
            os.umask(0o027)
            fd = os.open(path, os.O_TMPFILE | os.O_RDWR, 0o666)
            try:
                dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    name = b"/proc/self/fd/%d" % fd
                    os.link(name, "mine", dst_dir_fd=dfd, follow_symlinks=True)
                finally:
                    os.close(dfd)
            finally:
                os.close(fd)
        assert wk.run_as(1000, 1000, make) == "ok"
        st = os.lstat(root / "pub/mine")
        res[side] = (st.st_uid, st.st_gid, oct(st.st_mode))
    assert res["ours"] == res["kernel"] == (1000, 1000, oct(0o100640)), res
    P.uppers_equal()
