"""O_DIRECT through the mount, differential against the kernel overlay.

Aligned direct reads and writes work on new files and on copied-up lower files (plain
pwrite/pread, and fio with the psync, libaio and io_uring engines, which verify what they
wrote), and the data is still there after a remount. Misaligned direct I/O gets what the
upper filesystem gives (EINVAL on ext4) and writes nothing. Pages that another opener wrote
through the page cache are flushed safely even when the kernel sends them through the
O_DIRECT handle.
"""
from __future__ import annotations

import mmap
import os
import shutil
import subprocess

import pytest

import writekit as wk
from layerkit import File
from pairkit import pair  # noqa: F401  (fixture)

pytestmark = [pytest.mark.mount, pytest.mark.kernel]

LOWER_DATA = bytes(range(256)) * 64            # 16 KiB


def aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, max(len(data), 1))
    buf[:len(data)] = data
    return buf


def dio_write(path, data, off, flags=os.O_WRONLY | os.O_CREAT):
    buf = aligned(data)
    fd = os.open(path, flags | os.O_DIRECT, 0o644)
    try:
        return os.pwritev(fd, [memoryview(buf)[:len(data)]], off)
    finally:
        os.close(fd)
        buf.close()


def dio_read(path, size, off):
    buf = mmap.mmap(-1, max(size, 1))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [memoryview(buf)[:size]], off)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def spec():
    return {"low": File(LOWER_DATA), "dir/low2": File(LOWER_DATA)}


def test_aligned_direct_io_new_and_copied_up(pair):
    p = pair(spec())
    block = b"A" * 4096 + b"B" * 4096
    steps = [
        ("write new", lambda path: dio_write(path, block, 0), "new"),
        ("extend new", lambda path: dio_write(path, b"C" * 4096, 8192), "new"),
        ("read new", lambda path: dio_read(path, 16384, 0), "new"),
        ("read lower", lambda path: dio_read(path, 16384, 0), "low"),
        ("write lower (copy-up)", lambda path: dio_write(path, block, 4096, os.O_RDWR),
         "low"),
        ("read copied-up", lambda path: dio_read(path, 16384, 0), "low"),
        ("write deeper lower", lambda path: dio_write(path, b"D" * 512, 512, os.O_WRONLY),
         "dir/low2"),
        ("read 512 at 512", lambda path: dio_read(path, 1024, 0), "dir/low2"),
    ]
    for what, fn, rel in steps:
        r = p.both(fn, rel, what=what)
        assert r[0] == "ok", f"{what}: {r}"
    want = {"new": block + b"C" * 4096,
            "low": LOWER_DATA[:4096] + block + LOWER_DATA[12288:],
            "dir/low2": LOWER_DATA[:512] + b"D" * 512 + LOWER_DATA[1024:]}
    for rel, data in want.items():
        assert wk.read_file(p.o(rel)) == data, rel
        assert wk.read_file(os.path.join(p.oupper, rel)) == data, rel
    p.check()
    p.remount()
    for rel, data in want.items():
        assert dio_read(p.o(rel), 1 << 20, 0) == data, rel
        assert wk.read_file(p.o(rel)) == data, rel
    p.check()


def test_misaligned_direct_io_as_the_upper_filesystem(pair):
    p = pair(spec())
    p.both(lambda path: dio_write(path, b"A" * 4096, 0), "new")
    before = wk.upper_snapshot(p.oupper)
    cases = [
        ("write at offset 100", lambda path: dio_write(path, b"x" * 4096, 100, os.O_WRONLY),
         "new"),
        ("write 100 bytes", lambda path: dio_write(path, b"x" * 100, 0, os.O_WRONLY), "new"),
        ("extend by 100 bytes", lambda path: dio_write(path, b"x" * 100, 4096, os.O_WRONLY),
         "new"),
        ("read at offset 100", lambda path: dio_read(path, 4096, 100), "new"),
        ("read 100 bytes", lambda path: dio_read(path, 100, 0), "new"),
        ("read lower at 100", lambda path: dio_read(path, 4096, 100), "low"),
    ]
    for what, fn, rel in cases:
        r = p.both(fn, rel, what=what)
        assert r == ("err", "EINVAL"), f"{what}: {r}"
    assert wk.upper_snapshot(p.oupper) == before
    p.check()


def test_page_cache_flush_through_a_direct_handle(make_layers, mounted):
    """With the writeback cache the kernel flushes pages dirtied through one handle through
    the most recently opened writable handle, here an O_DIRECT one: an unaligned tail must
    still reach the upper file (not fail with EINVAL and be lost)."""
    from conftest import fuse_only
    fuse_only("the FUSE writeback cache")
    stack = make_layers({"f": "x"}, upper=True)
    m = mounted(stack)
    path = os.path.join(wk.mp(m), "g")
    buffered = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    direct = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        os.write(buffered, b"hello, tail")          # dirty page, 11 bytes
        os.close(buffered)                          # flush (through `direct`), release
        buffered = None
        os.ftruncate(direct, 5000)
        mm = mmap.mmap(direct, 5000)
        mm[4096:4100] = b"mmap"
        mm[0:5] = b"HELLO"
        mm.flush()
        mm.close()
        os.fsync(direct)
    finally:
        if buffered is not None:
            os.close(buffered)
        os.close(direct)
    want = b"HELLO, tail" + b"\0" * (4096 - 11) + b"mmap" + b"\0" * (5000 - 4100)
    assert wk.read_file(os.path.join(stack.upper, "g")) == want
    assert wk.read_file(path) == want


FIO = shutil.which("fio")


@pytest.mark.skipif(FIO is None, reason="fio not installed (make setup installs it)")
@pytest.mark.parametrize("engine", ["psync", "libaio", "io_uring"])
def test_fio_direct_verify(pair, engine):
    """fio writes with O_DIRECT through each engine and verifies what it wrote, on a new
    file and on a copied-up lower file; after a remount it verifies again."""
    p = pair({"low": File(LOWER_DATA * 16)})            # 256 KiB
    common = ["--ioengine=" + engine, "--direct=1", "--bs=4k", "--iodepth=8",
              "--verify=crc32c", "--size=256k", "--output-format=terse",
              "--randseed=1234", "--verify_state_save=0"]

    def fio(path, *extra):
        r = subprocess.run([FIO, "--name=t", "--filename=" + path, *common, *extra],
                           capture_output=True, text=True)
        return r.returncode, r.stderr[-2000:]

    for rel in ("new", "low"):
        for root in (p.o(), p.k()):
            rc, err = fio(os.path.join(root, rel), "--rw=randwrite", "--do_verify=1")
            assert rc == 0, f"fio {engine} on {root}/{rel}: {err}"
    # (fio's verify headers carry time stamps: the two mounts' data differ by design)
    assert wk.tree_paths(p.oupper) == wk.tree_paths(p.kupper) == ["low", "new"]
    p.remount()
    for rel in ("new", "low"):
        rc, err = fio(p.o(rel), "--rw=randwrite", "--verify_only")
        assert rc == 0, f"fio {engine} verify after remount, {rel}: {err}"
