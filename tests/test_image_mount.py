"""``overlayfs-py image mount``: an image from a layout or archive, mounted with the same daemon
and command line as the plain mount, compared with the kernel overlay mounting the very same
store layers.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import imagekit  # noqa: E402
import layerkit  # noqa: E402
from conftest import require_fuse, require_kernel_overlay  # noqa: E402
from imagekit import Layout, make_tar  # noqa: E402
from test_image_store import BASE, TOP, cli, layer_root, one_line_error  # noqa: E402

import overlayfs_py  # noqa: E402
from overlayfs_py.image.store import Store  # noqa: E402

pytestmark = pytest.mark.mount


@pytest.fixture
def image(tmp_path):
    require_fuse()
    lay = Layout(tmp_path / "layout")
    built = lay.write_image([make_tar(BASE), make_tar(TOP)], tag="v1", compression="gzip")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return lay, built, tmp_path / "store", mnt


def _daemon_pid(mnt: Path):
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"overlayfs_py" in a or b"overlayfs-py" in a for a in argv[:3]) and \
                os.fsencode(str(mnt)) in argv:
            return int(entry)
    return None


def _mount_line(mnt: Path) -> str:
    with open("/proc/mounts") as f:
        return [l for l in f if f" {mnt} " in l][0]


def _unmount_and_wait(mnt: Path, pid) -> None:
    r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 20
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    assert pid is None or time.monotonic() < deadline, "the daemon did not exit"


def test_image_mount_daemon_read_only_and_leased(image):
    lay, built, store, mnt = image
    r = cli("image", "mount", f"{lay.root}:v1", mnt, "--store", store)
    assert r.returncode == 0, r.stderr
    pid = None
    try:
        assert layerkit.is_mounted(mnt)             # live when the command returns
        pid = _daemon_pid(mnt)
        assert pid is not None
        assert (mnt / "etc/motd").read_text() == "bye\n"
        assert not os.path.lexists(mnt / "etc/passwd")
        assert not os.path.lexists(mnt / "home/user")
        assert sorted(os.listdir(mnt / "var/cache")) == ["new"]
        assert os.readlink(mnt / "bin/ls") == "busybox"
        assert os.stat(mnt / "bin/sh").st_ino == os.stat(mnt / "bin/busybox").st_ino
        with pytest.raises(OSError) as e:
            (mnt / "etc/new").write_text("x")
        assert e.value.errno == errno.EROFS
        with Store(str(store)) as s:
            assert all(s.layer_in_use(d) for d in built.diff_ids)
    finally:
        if layerkit.is_mounted(mnt):
            _unmount_and_wait(mnt, pid)
    with Store(str(store)) as s:
        assert not any(s.layer_in_use(d) for d in built.diff_ids)


def test_image_mount_foreground_with_upper(image, tmp_path):
    lay, built, store, mnt = image
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "overlayfs_py", "image", "mount", "-f",
                             f"{lay.root}:v1", str(mnt), "--store", str(store), "--upper",
                             str(upper), "--work", str(work), "-o", "noatime", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not layerkit.is_mounted(mnt):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (mnt / "etc/new").write_text("new\n")
        os.unlink(mnt / "etc/motd")
        os.chmod(mnt / "bin/busybox", 0o755)
        assert "noatime" in _mount_line(mnt).split()[3]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        out, errs = proc.communicate(timeout=30)
    assert proc.returncode == 0, errs
    assert (upper / "etc/new").read_text() == "new\n"
    st = os.lstat(upper / "etc/motd")
    assert st.st_rdev == 0 and (st.st_mode & 0o170000) == 0o020000
    assert (upper / "bin/busybox").stat().st_mode & 0o7777 == 0o755


def test_image_mount_equals_kernel_overlay_of_the_store(image, tmp_path):
    require_kernel_overlay()
    lay, built, store, mnt = image
    r = cli("image", "unpack", f"{lay.root}:v1", "--store", store, "--json")
    assert r.returncode == 0, r.stderr
    lowers = json.loads(r.stdout)["lowerdir"]
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    with overlayfs_py.image_mount(f"{lay.root}:v1", str(mnt), store=str(store)) as m:
        assert m.plan.lowers == lowers
        with layerkit.kernel_overlay(lowers, mnt=kmnt):
            ours = layerkit.snapshot(mnt, nlink=False)
            kernel = layerkit.snapshot(kmnt, nlink=False)
    assert len(ours) > 20
    assert layerkit.diff_snapshots(ours, kernel, ("overlayfs-py", "kernel")) == []


def test_image_mount_oci_markers_same_view(image, tmp_path):
    lay, built, store, mnt = image
    mnt2 = tmp_path / "mnt2"
    mnt2.mkdir()
    with overlayfs_py.image_mount(f"{lay.root}:v1", str(mnt), store=str(store)), \
            overlayfs_py.image_mount(f"{lay.root}:v1", str(mnt2), store=str(store),
                                     oci_markers=True):
        a = layerkit.snapshot(mnt, nlink=False)
        b = layerkit.snapshot(mnt2, nlink=False)
    assert layerkit.diff_snapshots(a, b, ("kernel format", "OCI markers")) == []
    assert layer_root(store, built.diff_ids[1], oci=True).is_dir()


def test_image_mount_errors_are_one_line_and_mount_nothing(image, tmp_path):
    lay, built, store, mnt = image
    one_line_error(cli("image", "mount", f"{lay.root}:v1", mnt, "--store", store, "-o",
                       "bogus"), "bogus")
    one_line_error(cli("image", "mount", f"{lay.root}:v2", mnt, "--store", store),
                   "no image tagged 'v2'")
    one_line_error(cli("image", "mount", f"{lay.root}:v1", mnt, "--store", store, "--upper",
                       tmp_path), "--upper and --work go together")
    one_line_error(cli("image", "mount", f"{lay.root}:v1", tmp_path / "nomnt", "--store",
                       store), "nomnt")
    assert not layerkit.is_mounted(mnt)
    with Store(str(store)) as s:
        assert not any(s.layer_in_use(d) for d in built.diff_ids)


def test_mount8_form_with_a_source_named_like_a_command(tmp_path):
    """The plain command lines are unchanged: ``overlayfs-py image MNT -o lowerdir=...`` is
    the mount(8) form with SOURCE "image", not an image command."""
    require_fuse()
    lower = tmp_path / "lower"
    lower.mkdir()
    (lower / "f").write_text("plain")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for word in ("image", "diff", "commit"):
        r = cli(word, mnt, "-o", f"lowerdir={lower}")
        assert r.returncode == 0, r.stderr
        try:
            assert (mnt / "f").read_text() == "plain"
            assert _mount_line(mnt).split()[0] == word
        finally:
            pid = _daemon_pid(mnt)
            _unmount_and_wait(mnt, pid)
