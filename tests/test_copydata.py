"""copydata: the copy-up data path keeps holes, and copies every data extent (no mount)."""
import os

from overlayfs_py.copydata import copy_file_data

MiB = 1 << 20


def _sparse(path, size, extents):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in extents:
            f.seek(off)
            f.write(data)


def test_sparse_file_stays_sparse(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = 64 * MiB
    extents = [(0, b"head" * 1024), (32 * MiB, os.urandom(MiB)), (size - 4096, b"t" * 4096)]
    _sparse(src, size, extents)
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copy_file_data(s, d, size)
    finally:
        os.close(s)
        os.close(d)
    assert dst.read_bytes() == src.read_bytes()
    st_src, st_dst = os.stat(src), os.stat(dst)
    assert st_dst.st_size == size
    # only the data extents were written (a dense copy would be 64 MiB = 131072 blocks)
    assert st_dst.st_blocks <= st_src.st_blocks + 64


def test_trailing_hole_and_empty_file(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _sparse(src, 10 * MiB, [(0, b"x")])
    s = os.open(src, os.O_RDONLY)
    d = os.open(dst, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copy_file_data(s, d, 10 * MiB)
    finally:
        os.close(s)
        os.close(d)
    assert os.stat(dst).st_size == 10 * MiB
    assert dst.read_bytes()[:1] == b"x"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    s = os.open(empty, os.O_RDONLY)
    d = os.open(tmp_path / "e2", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copy_file_data(s, d, 0)
    finally:
        os.close(s)
        os.close(d)
    assert os.stat(tmp_path / "e2").st_size == 0
