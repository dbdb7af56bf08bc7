"""metacopy=on: chmod/chown/utimes/xattr changes of a lower file copy metadata only, in the
kernel's format, so the kernel overlay (mounted with metacopy=on) reads our upper layer and
we read its. Data is copied up at the first real write."""
import os
import subprocess

import pytest

import overlayfs_py

pytestmark = pytest.mark.mount

SIZE = 8 << 20


@pytest.fixture
def stack(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root and /dev/fuse")
    for d in ("lower", "upper", "work", "mnt"):
        (tmp_path / d).mkdir()
    data = os.urandom(SIZE)
    (tmp_path / "lower" / "big").write_bytes(data)
    return tmp_path, data


def _mount(tmp_path, **kw):
    return overlayfs_py.mount(lower=[str(tmp_path / "lower")], upper=str(tmp_path / "upper"),
                              work=str(tmp_path / "work"), mountpoint=str(tmp_path / "mnt"), **kw)


def _kernel(tmp_path):
    t = tmp_path
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={t}/lower,upperdir={t}/upper,workdir={t}/work,metacopy=on",
                    str(t / "mnt")], check=True)


def _umount(mnt):
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_chmod_copies_metadata_only_and_kernel_reads_it(stack):
    t, data = stack
    with _mount(t, options=("metacopy=on",)):
        os.chmod(t / "mnt" / "big", 0o600)
        os.setxattr(t / "mnt" / "big", "user.tag", b"v")
        up = t / "upper" / "big"
        st = os.stat(up)
        assert st.st_size == SIZE and st.st_blocks == 0          # no data copied
        assert os.getxattr(up, "trusted.overlay.metacopy") == b""
        assert "trusted.overlay.metacopy" not in os.listxattr(t / "mnt" / "big")
        assert (t / "mnt" / "big").read_bytes() == data
        assert os.stat(t / "mnt" / "big").st_mode & 0o777 == 0o600
    _kernel(t)
    try:
        assert (t / "mnt" / "big").read_bytes() == data
        assert os.stat(t / "mnt" / "big").st_mode & 0o777 == 0o600
        assert os.getxattr(t / "mnt" / "big", "user.tag") == b"v"
    finally:
        _umount(t / "mnt")


def test_first_write_completes_the_copy(stack):
    t, data = stack
    with _mount(t, options=("metacopy=on",)):
        os.chmod(t / "mnt" / "big", 0o640)
    with _mount(t, options=("metacopy=on",)):                     # found again after remount
        rfd = os.open(t / "mnt" / "big", os.O_RDONLY)
        try:
            with open(t / "mnt" / "big", "ab") as f:
                f.write(b"tail")
            assert os.pread(rfd, 16, SIZE) == b"tail"             # the reader sees the new data
        finally:
            os.close(rfd)
        assert (t / "mnt" / "big").read_bytes() == data + b"tail"
        assert "trusted.overlay.metacopy" not in os.listxattr(t / "upper" / "big")
    assert (t / "upper" / "big").read_bytes() == data + b"tail"
    _kernel(t)
    try:
        assert (t / "mnt" / "big").read_bytes() == data + b"tail"
    finally:
        _umount(t / "mnt")


def test_kernel_metacopy_upper_is_read_by_us(stack):
    t, data = stack
    _kernel(t)
    try:
        os.chmod(t / "mnt" / "big", 0o604)
    finally:
        _umount(t / "mnt")
    assert os.getxattr(t / "upper" / "big", "trusted.overlay.metacopy") == b""
    with _mount(t, options=("metacopy=on",)):
        assert (t / "mnt" / "big").read_bytes() == data
        assert os.stat(t / "mnt" / "big").st_mode & 0o777 == 0o604


def test_without_metacopy_chmod_copies_data(stack):
    t, data = stack
    with _mount(t):
        os.chmod(t / "mnt" / "big", 0o600)
    assert (t / "upper" / "big").read_bytes() == data
    assert "trusted.overlay.metacopy" not in os.listxattr(t / "upper" / "big")
