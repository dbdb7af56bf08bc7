"""Large reads through the mount: every path of Operations.read returns the right bytes.

A READ of 128 KiB or more first copies what the host page cache holds (preadv RWF_NOWAIT),
hands the rest to a worker thread, and falls back to the thread alone where the filesystem
refuses RWF_NOWAIT (tmpfs). A wrong byte count would be worse than slow: a short reply tells
the kernel the file ends there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import writekit as wk
from layerkit import file_sha256
from conftest import fuse_only

pytestmark = pytest.mark.mount

SIZE = 6 * 1024 * 1024 + 12345          # not a multiple of any request size


def _payload() -> bytes:
    return hashlib.sha256(b"seed").digest() * (SIZE // 32) + b"tail" * 4


@pytest.fixture(autouse=True)
def _hang_guard(tmp_path):
    # a daemon that stops answering fails the test instead of blocking the run
    with wk.watchdog(tmp_path, 60, "large-read test"):
        yield


def test_big_file_partly_in_the_host_cache(make_layers, mounted):
    """Some 1 MiB requests find all, part or none of their range in the host cache: RWF_NOWAIT
    copies what is there and a thread reads the rest; bytes and length must come out exact.
    (Checked: answering a partly cached request short makes this test fail.)"""
    data = _payload()
    stack = make_layers({"big": data}, upper=True)
    path = stack.lowers[0] / "big"
    with open(path, "rb") as f:
        fd = f.fileno()
        os.fsync(fd)                                       # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)   # cache exactly what is read
        for off, n in ((0, 1 << 20), (2 << 20, 1 << 19), (4 << 20, 3 << 19)):
            os.pread(fd, n, off)                           # cached: 0-1, 2-2.5, 4-5.5 MiB
    m = mounted(stack)
    assert file_sha256(Path(wk.mp(m)) / "big") == hashlib.sha256(data).hexdigest()


def test_big_file_on_tmpfs_which_refuses_nowait(mounted, tmp_path):
    """tmpfs answers RWF_NOWAIT with EOPNOTSUPP: the handle must fall back to plain reads."""
    fuse_only("the daemon's read path")
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    base = Path(tempfile.mkdtemp(prefix="ovl-reads-", dir="/dev/shm"))
    try:
        for d in ("lower", "upper", "work"):
            (base / d).mkdir()
        data = _payload()
        (base / "lower/big").write_bytes(data)
        stack = wk.Stack.from_dirs(tmp_path, "s", [base / "lower"], base / "upper", base / "work")
        m = mounted(stack, mnt=stack.mnt)
        assert file_sha256(Path(wk.mp(m)) / "big") == hashlib.sha256(data).hexdigest()
    finally:
        shutil.rmtree(base, ignore_errors=True)
