"""Faults: a full or read-only upper filesystem, I/O errors and vanished directories in a
lower layer, signals, a dead daemon, and more open files than the daemon may hold.

Each fault runs on our daemon and on the kernel overlay (``impl``), with the outcome each
one must show written down in the test: the errno, that nothing acknowledged is lost, and
that the mount keeps serving. The README's fault table is this file's summary.

Small filesystems are ext4 images on loop devices (``faultkit.small_fs``); an I/O error is
a loop device over a FUSE file that fails reads of chosen blocks (``faultkit.faulty_ext4``:
this kernel has no device-mapper).
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import faultkit
import layerkit
import writekit as wk
from conftest import fuse_only, require_fuse, require_kernel_overlay

pytestmark = [pytest.mark.mount]

MiB = 1 << 20


def _errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno))


def outcome(fn, *a, **kw) -> str:
    """"ok" or the errno name."""
    try:
        fn(*a, **kw)
        return "ok"
    except OSError as e:
        return _errname(e)


def append(path, data=b"+"):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def create(path, data=b"new\n"):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def files_under(d) -> list:
    """Non-directories below d (temporaries a failed operation could leave)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        out += [os.path.join(dirpath, n) for n in filenames]
        out += [os.path.join(dirpath, n) for n in dirnames
                if os.path.islink(os.path.join(dirpath, n))]
    return out


class Target:
    """The overlay under test: ours (a FUSE daemon) or the kernel's."""

    def __init__(self, impl: str, exits: contextlib.ExitStack):
        self.impl, self.exits, self.fm = impl, exits, None

    def enter(self, cm):
        """Enter a fault context (a small filesystem, a faulty disk) so that it is torn down
        after the mounts made on it, whatever happens."""
        return self.exits.enter_context(cm)

    def mount(self, lowers, upper, work, mnt, options=()) -> Path:
        Path(mnt).mkdir(parents=True, exist_ok=True)
        if self.impl == "kernel":
            require_kernel_overlay()
            self.exits.enter_context(layerkit.kernel_overlay(
                lowers, upper, work, mnt=mnt, options=wk.KERNEL_OPTS))
        else:
            require_fuse()
            self.fm = self.exits.enter_context(layerkit.fuse_mount(
                None, lowers, upper, work, mnt, options))
        return Path(mnt)

    def alive(self) -> bool:
        return self.fm is None or self.fm.proc.poll() is None

    def daemon_log(self) -> str:
        return self.fm.log() if self.fm is not None else ""


@pytest.fixture(params=["ours", "kernel"])
def target(request, tmp_path):
    if request.param == "ours":
        fuse_only("runs our daemon")
    if not faultkit.have_loop():
        pytest.skip("needs root, loop devices and mkfs.ext4")
    with contextlib.ExitStack() as exits:
        t = Target(request.param, exits)
        with wk.watchdog(tmp_path, 240, "fault test"):
            yield t
        assert t.alive(), "the daemon died:\n" + t.daemon_log()
        assert "internal error" not in t.daemon_log(), t.daemon_log()
    assert not faultkit.loop_devices_of(tmp_path), "loop devices left behind"


def lower_dir(tmp_path, spec, name="lower"):
    return layerkit.make_layer(tmp_path / name, spec)


def fill(path, chunk=MiB) -> str:
    """Write ``path`` until the filesystem is full (fsync after each chunk, then ever
    smaller chunks); returns the errno name that stopped it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = None
    try:
        while chunk >= 4096:
            try:
                os.write(fd, b"\xaa" * chunk)
                os.fsync(fd)
            except OSError as e:
                err = _errname(e)
                chunk //= 4
    finally:
        try:
            os.close(fd)
        except OSError as e:
            err = err or _errname(e)
    return err


# ---------------------------------------------------------------------------------------------
# upper filesystem full
# ---------------------------------------------------------------------------------------------

def test_enospc_copy_up(target, tmp_path):
    """Copy-up of a file larger than the free space fails with ENOSPC, leaves nothing in the
    upper layer or the workdir, and the lower file stays readable; once space is freed the
    same operations work without a remount."""
    big = random.Random(1).randbytes(24 * MiB)
    low = lower_dir(tmp_path, {"big": big, "small": b"s" * 8192, "d/x": "x"})
    fs = target.enter(faultkit.small_fs(tmp_path, "up", size_mb=16))
    (fs / "upper").mkdir()
    (fs / "work").mkdir()
    m = target.mount([low], fs / "upper", fs / "work", tmp_path / "mnt")
    free0 = faultkit.free_blocks(fs)
    assert outcome(append, m / "big") == "ENOSPC"
    assert not os.path.lexists(fs / "upper/big")
    assert files_under(fs / "work") == [], "copy-up leftovers in the workdir"
    assert faultkit.free_blocks(fs) >= free0 - 4, "the failed copy-up still holds space"
    assert wk.read_file(m / "big") == big
    # a full disk: even a small copy-up fails, and so does creating data
    assert fill(m / "filler") == "ENOSPC"
    assert outcome(append, m / "small") == "ENOSPC"
    assert not os.path.lexists(fs / "upper/small")
    assert wk.read_file(m / "small") == b"s" * 8192
    # space freed: the same operations succeed, no remount
    os.unlink(m / "filler")
    assert outcome(append, m / "small") == "ok"
    assert wk.read_file(m / "small") == b"s" * 8192 + b"+"
    assert outcome(append, m / "big") == "ENOSPC"           # still larger than the disk
    assert wk.read_file(m / "big") == big
    assert sorted(os.listdir(m)) == ["big", "d", "small"]


@pytest.mark.parametrize("writeback", ["1", "0"])
def test_enospc_writes(target, tmp_path, writeback):
    """Writes that fill the disk fail with ENOSPC (ours with the writeback cache: at fsync()
    or close() at the latest, see the README); what was acknowledged before is intact; after
    space is freed, writing works again."""
    if target.impl == "kernel" and writeback == "0":
        pytest.skip("writeback is our option")
    low = lower_dir(tmp_path, {"lo": "lower\n"})
    keep = random.Random(2).randbytes(256 << 10)
    fs = target.enter(faultkit.small_fs(tmp_path, "up", size_mb=16))
    (fs / "upper").mkdir()
    (fs / "work").mkdir()
    m = target.mount([low], fs / "upper", fs / "work", tmp_path / "mnt",
                     options=(f"writeback={writeback}",))
    wk.write_file(m / "keep", keep, fsync=True)
    # a writer that fsyncs every 256 KiB: what fsync acknowledged must stay
    data = random.Random(3).randbytes(32 * MiB)
    fd = os.open(m / "fill", os.O_WRONLY | os.O_CREAT, 0o644)
    acked, where, err = 0, None, None
    try:
        for off in range(0, len(data), 256 << 10):
            try:
                os.write(fd, data[off:off + (256 << 10)])
            except OSError as e:
                where, err = "write", _errname(e)
                break
            try:
                os.fsync(fd)
            except OSError as e:
                where, err = "fsync", _errname(e)
                break
            acked = off + (256 << 10)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    assert err == "ENOSPC", (where, err)
    if target.impl == "kernel" or writeback == "0":
        assert where == "write"
    assert acked > 8 * MiB
    assert wk.read_file(m / "fill")[:acked] == data[:acked], "acknowledged data lost"
    assert wk.read_file(m / "keep") == keep
    # a writer that never fsyncs is told by close() at the latest
    fd = os.open(m / "nosync", os.O_WRONLY | os.O_CREAT, 0o644)
    seen = None
    try:
        for _ in range(32):
            os.write(fd, b"z" * MiB)
    except OSError as e:
        seen = "write " + _errname(e)
    finally:
        try:
            os.close(fd)
        except OSError as e:
            seen = seen or "close " + _errname(e)
    assert seen is not None and seen.endswith("ENOSPC"), f"ENOSPC never reported: {seen}"
    print(f"{target.impl} writeback={writeback}: fsync'ing writer: {where} {err}, "
          f"{acked} bytes acknowledged; writer without fsync: {seen}")
    if target.impl == "kernel" or writeback == "0":
        assert seen.startswith("write")
    # free the space: the same work succeeds without a remount
    os.unlink(m / "fill")
    os.unlink(m / "nosync")
    wk.write_file(m / "again", data[:4 * MiB], fsync=True)
    assert wk.read_file(m / "again") == data[:4 * MiB]
    assert outcome(append, m / "lo") == "ok"
    assert sorted(os.listdir(m)) == ["again", "keep", "lo"]


def test_inode_exhaustion(target, tmp_path):
    """No free inodes: create and mkdir fail with ENOSPC, and so does a copy-up; what exists
    stays readable; after deleting some files both work again without a remount."""
    low = lower_dir(tmp_path, {"lo/a": "a", "lo/b": "b"})
    fs = target.enter(faultkit.small_fs(tmp_path, "up", size_mb=16, inodes=64))
    (fs / "upper").mkdir()
    (fs / "work").mkdir()
    m = target.mount([low], fs / "upper", fs / "work", tmp_path / "mnt")
    os.mkdir(m / "n")
    made, err = [], None
    for i in range(1000):
        try:
            create(m / f"n/f{i}", f"{i}\n".encode())
            made.append(i)
        except OSError as e:
            err = _errname(e)
            break
    assert err == "ENOSPC" and len(made) > 10, (err, len(made))
    assert faultkit.free_inodes(fs) == 0
    assert outcome(os.mkdir, m / "n/dir") == "ENOSPC"
    assert outcome(create, m / "n/more") == "ENOSPC"
    assert outcome(append, m / "lo/a") == "ENOSPC"            # copy-up needs inodes
    assert not os.path.lexists(fs / "upper/lo")
    assert files_under(fs / "work") == []
    for i in made:
        assert wk.read_file(m / f"n/f{i}") == f"{i}\n".encode()
    assert wk.read_file(m / "lo/a") == b"a"
    for i in made[:6]:
        os.unlink(m / f"n/f{i}")
    assert outcome(os.mkdir, m / "n/dir") == "ok"
    assert outcome(create, m / "n/more") == "ok"
    assert outcome(append, m / "lo/a") == "ok"
    assert wk.read_file(m / "lo/a") == b"a+"


# ---------------------------------------------------------------------------------------------
# upper filesystem remounted read-only
# ---------------------------------------------------------------------------------------------

def test_upper_remounted_read_only(target, tmp_path):
    """Writes fail with EROFS, reads keep working; remounted read-write, writes work again."""
    low = lower_dir(tmp_path, {"lo/a": "a", "lo/big": random.Random(4).randbytes(MiB)})
    fs = target.enter(faultkit.small_fs(tmp_path, "up", size_mb=64))
    (fs / "upper").mkdir()
    (fs / "work").mkdir()
    m = target.mount([low], fs / "upper", fs / "work", tmp_path / "mnt")
    wk.write_file(m / "up", b"upper\n", fsync=True)
    os.mkdir(m / "updir")
    faultkit.remount(fs, "ro")
    try:
        got = {
            "create": outcome(create, m / "new"),
            "write": outcome(append, m / "up"),
            "copy-up": outcome(append, m / "lo/a"),
            "unlink": outcome(os.unlink, m / "lo/a"),
            "unlink-upper": outcome(os.unlink, m / "up"),
            "mkdir": outcome(os.mkdir, m / "d2"),
            "rmdir": outcome(os.rmdir, m / "updir"),
            "rename": outcome(os.rename, m / "up", m / "up2"),
            "chmod": outcome(os.chmod, m / "up", 0o600),
            "setxattr": outcome(os.setxattr, m / "up", "user.x", b"1"),
            "truncate": outcome(os.truncate, m / "lo/big", 0),
        }
        assert set(got.values()) == {"EROFS"}, got
        assert wk.read_file(m / "up") == b"upper\n"
        assert wk.read_file(m / "lo/a") == b"a"
        assert len(wk.read_file(m / "lo/big")) == MiB
        assert sorted(os.listdir(m)) == ["lo", "up", "updir"]
    finally:
        faultkit.remount(fs, "rw")
    assert outcome(create, m / "new") == "ok"
    assert outcome(append, m / "lo/a") == "ok"
    assert wk.read_file(m / "lo/a") == b"a+"


# ---------------------------------------------------------------------------------------------
# I/O errors from a lower layer
# ---------------------------------------------------------------------------------------------

def _eio_stack(tmp_path):
    good = random.Random(5).randbytes(200 << 10)
    bad = random.Random(6).randbytes(300 << 10)
    src = lower_dir(tmp_path, {"good/a": good, "bad": bad, "d/c": "c\n", "d/e/f": "f\n"},
                   "populate")
    return src, good, bad


def test_lower_read_error(target, tmp_path):
    """Reads of a file whose blocks fail give EIO for that file alone; other files and the
    mount keep working; a copy-up of the file fails cleanly with nothing left behind."""
    src, good, bad = _eio_stack(tmp_path)
    low, disk = target.enter(faultkit.faulty_ext4(tmp_path, "lower", src, bad_files=["bad"]))
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    m = target.mount([low], tmp_path / "upper", tmp_path / "work", tmp_path / "mnt")
    assert wk.read_file(m / "good/a") == good
    assert outcome(wk.read_file, m / "bad") == "EIO"
    assert os.stat(m / "bad").st_size == len(bad)            # metadata is readable
    assert wk.read_file(m / "good/a") == good
    assert wk.read_file(m / "d/c") == b"c\n"
    assert sorted(os.listdir(m)) == ["bad", "d", "good", "lost+found"]
    assert outcome(append, m / "bad") == "EIO"                # copy-up reads the data
    assert outcome(os.truncate, m / "bad", 10) == "EIO"
    assert not os.path.lexists(tmp_path / "upper/bad")
    assert files_under(tmp_path / "work") == []
    assert outcome(wk.read_file, m / "bad") == "EIO"
    assert outcome(create, m / "new") == "ok"
    assert outcome(append, m / "d/c") == "ok"
    assert wk.read_file(m / "d/c") == b"c\n+"
    assert outcome(os.unlink, m / "bad") == "ok"              # a whiteout needs no data
    assert sorted(os.listdir(m)) == ["d", "good", "lost+found", "new"]


def test_lower_device_fails(target, tmp_path):
    """The whole lower device starts failing: what needs it gives EIO, the upper layer and
    the mount keep working."""
    src, good, _ = _eio_stack(tmp_path)
    low, disk = target.enter(faultkit.faulty_ext4(tmp_path, "lower", src))
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    m = target.mount([low], tmp_path / "upper", tmp_path / "work", tmp_path / "mnt")
    assert wk.read_file(m / "good/a") == good
    wk.write_file(m / "mine", b"mine\n", fsync=True)
    disk.set_bad([(0, None)])
    seen = {
        "read": outcome(wk.read_file, m / "bad"),
        "list": outcome(os.listdir, m / "d/e"),
        "copy-up": outcome(append, m / "d/c"),
    }
    assert set(seen.values()) == {"EIO"}, seen
    assert wk.read_file(m / "mine") == b"mine\n"
    assert outcome(create, m / "new") == "ok"
    assert outcome(append, m / "mine") == "ok"
    assert wk.read_file(m / "mine") == b"mine\n+"
    disk.set_bad([])                      # the device comes back before the unmount


# ---------------------------------------------------------------------------------------------
# a lower directory removed or renamed behind the mount's back
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["removed", "renamed"])
def test_lower_dir_changed_behind_the_mount(target, tmp_path, how):
    """Lookups below a lower directory that was removed or renamed behind the mount give
    ENOENT (or a stale but consistent answer from the kernel's caches), never EIO, a crash
    or a hang; the rest of the mount keeps serving."""
    low = lower_dir(tmp_path, {"d/f": "f\n", "d/sub/g": "g\n", "d/sub/h": "h\n",
                               "other/x": "x\n"})
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    m = target.mount([low], tmp_path / "upper", tmp_path / "work", tmp_path / "mnt")
    assert sorted(os.listdir(m / "d")) == ["f", "sub"]
    assert wk.read_file(m / "d/f") == b"f\n"
    os.stat(m / "d/sub")
    held = os.open(m / "d/sub/g", os.O_RDONLY)
    try:
        if how == "removed":
            shutil.rmtree(low / "d")
        else:
            os.rename(low / "d", low / "d-moved")
        seen = {
            "stat d/f": outcome(os.stat, m / "d/f"),
            "read d/f": outcome(wk.read_file, m / "d/f"),
            "read d/sub/h": outcome(wk.read_file, m / "d/sub/h"),
            "list d/sub": outcome(os.listdir, m / "d/sub"),
            "stat d/none": outcome(os.stat, m / "d/none"),
            "create d/new": outcome(create, m / "d/new"),
            "copy-up d/f": outcome(append, m / "d/f"),
            "unlink d/sub/h": outcome(os.unlink, m / "d/sub/h"),
            "read held fd": outcome(os.pread, held, 10, 0),
        }
    finally:
        os.close(held)
    bad = {k: v for k, v in seen.items() if v not in ("ok", "ENOENT", "ESTALE")}
    assert not bad, f"unexpected errors: {bad} (all: {seen})"
    assert seen["stat d/none"] == "ENOENT"
    assert wk.read_file(m / "other/x") == b"x\n"
    assert outcome(create, m / "other/new") == "ok"
    assert outcome(append, m / "other/x") == "ok"
    assert wk.read_file(m / "other/x") == b"x\n+"
    print(f"{target.impl} {how}: {seen}")


# ---------------------------------------------------------------------------------------------
# signals and a dead daemon (ours only: the kernel overlay has no daemon)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_unmounts_cleanly(tmp_path, sig):
    """SIGTERM / SIGINT: the daemon detaches the mount, writes back what the kernel still
    caches and exits 0; a file that was still open keeps the data written to it. A new
    daemon mounted at once on the same mount point (a restart) is not disturbed when the
    old one ends."""
    require_fuse()
    fuse_only("signals the FUSE daemon")
    s = wk.Stack(tmp_path, [{"lo": "lower\n"}])
    closed = random.Random(7).randbytes(3 * MiB)
    dirty = random.Random(8).randbytes(2 * MiB)
    with wk.watchdog(tmp_path, 120, "signal test"):
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt,
                                 check_exit=False) as fm:
            wk.write_file(s.mnt / "closed", closed)
            append(s.mnt / "lo", b"appended\n")
            fd = os.open(s.mnt / "open", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, dirty)                         # in the kernel's cache, not synced
            try:
                os.kill(fm.pid, sig)
                deadline = time.monotonic() + 20
                while layerkit.is_mounted(s.mnt) and time.monotonic() < deadline:
                    time.sleep(0.01)
                # (seen intermittently in full runs: say whether the daemon still runs,
                # and where its threads wait, to tell a lost signal from a slow detach)
                assert not layerkit.is_mounted(s.mnt), (
                    f"still mounted 20 s after the signal; daemon exit status "
                    f"{fm.proc.poll()}; its threads:\n{layerkit.thread_states(fm.pid)}"
                    f"\n{fm.log()}")
                # restarted at once, while the old daemon still serves the open file
                with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt) as fm2:
                    rc = fm.proc.wait(timeout=30)
                    assert rc == 0, f"exit status {rc}:\n{fm.log()}"
                    assert layerkit.is_mounted(s.mnt) and fm2.proc.poll() is None, \
                        "the old daemon's exit unmounted the new mount"
                    # a write after the end may land in the dead mount's page cache (the
                    # writeback cache); close() then reports that it was not written. With
                    # FUSE passthrough the open file writes to the upper file itself, so the
                    # write lands there, as after `umount -l` of the kernel overlay.
                    late = outcome(os.write, fd, b"late")
                    closed_rc = outcome(os.close, fd)
                    fd = None
                    if late == "ok" and closed_rc == "ok":
                        dirty += b"late"        # not lost silently: checked just below
                    assert wk.read_file(s.mnt / "open") == dirty, \
                        "a write after the unmount was lost silently"
                    assert wk.read_file(s.mnt / "closed") == closed
                    assert wk.read_file(s.mnt / "lo") == b"lower\nappended\n"
            finally:
                if fd is not None:
                    outcome(os.close, fd)
        assert wk.read_file(s.upper / "closed") == closed
        got = wk.read_file(s.upper / "open")
        assert got == dirty, f"data of the open file lost: {len(got)} of {len(dirty)} bytes"
        assert files_under(s.work) == [] or all("#" not in p for p in files_under(s.work))


def test_signal_right_after_writes_is_never_lost(tmp_path):
    """A SIGTERM that lands while the daemon has just served writes unmounts within
    seconds, every time. It used to be lost about once in 20 tries (more under load): the
    task that unmounts was woken in the same trio batch as a worker that then slept in
    poll(2) without yielding (pyfuse3 patch 0012). The race needs many tries to show."""
    require_fuse()
    fuse_only("signals the FUSE daemon")
    rng = random.Random(9)
    with wk.watchdog(tmp_path, 300, "signal race test"):
        for i in range(30):
            s = wk.Stack(tmp_path / f"r{i}", [{"lo": "lower\n"}])
            with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt,
                                     check_exit=False) as fm:
                wk.write_file(s.mnt / "closed", rng.randbytes(MiB))
                fd = os.open(s.mnt / "open", os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.write(fd, rng.randbytes(MiB))
                    os.kill(fm.pid, signal.SIGTERM)
                    deadline = time.monotonic() + 5
                    while layerkit.is_mounted(s.mnt) and time.monotonic() < deadline:
                        time.sleep(0.005)
                    assert not layerkit.is_mounted(s.mnt), (
                        f"try {i}: still mounted 5 s after SIGTERM; daemon exit status "
                        f"{fm.proc.poll()}; its threads:\n{layerkit.thread_states(fm.pid)}")
                finally:
                    os.close(fd)
                assert fm.proc.wait(timeout=30) == 0, fm.log()


def test_dead_daemon_answers_enotconn_and_remounts(tmp_path):
    """A daemon that dies leaves a mount that answers ENOTCONN; ``fusermount3 -u`` and a
    mount over the same layers bring everything back at once."""
    require_fuse()
    fuse_only("kills the FUSE daemon")
    s = wk.Stack(tmp_path, [{"lo": "lower\n"}])
    with wk.watchdog(tmp_path, 120, "dead daemon test"):
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt,
                                 check_exit=False) as fm:
            wk.write_file(s.mnt / "f", b"data", fsync=True)
            os.kill(fm.pid, signal.SIGKILL)
            fm.proc.wait(timeout=30)
            assert outcome(os.stat, s.mnt / "f") == "ENOTCONN"
            assert outcome(os.listdir, s.mnt) == "ENOTCONN"
            r = subprocess.run(["fusermount3", "-u", str(s.mnt)], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt):
            assert wk.read_file(s.mnt / "f") == b"data"
            assert sorted(os.listdir(s.mnt)) == ["f", "lo"]
            append(s.mnt / "lo")


# ---------------------------------------------------------------------------------------------
# more open files than the daemon may hold
# ---------------------------------------------------------------------------------------------

OPENER = r'''
import errno, os, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
paths = sys.argv[1:]
fds, errs = [], {}
for p in paths:
    try:
        fds.append(os.open(p, os.O_RDONLY))
    except OSError as e:
        n = errno.errorcode.get(e.errno, str(e.errno))
        errs[n] = errs.get(n, 0) + 1
bad = sum(1 for fd in fds if os.pread(fd, 16, 0)[:1] != b"#")
print("opened", len(fds), "bad", bad, " ".join(f"{k}={v}" for k, v in errs.items()), flush=True)
sys.stdin.readline()
for fd in fds:
    os.close(fd)
print("closed", flush=True)
'''

NOPEN = 30_000
NCLIENTS = 3


def test_30000_open_files(target, tmp_path):
    """Three clients hold 30,000 files open through the mount at once. The kernel overlay
    opens them all; the daemon, whose descriptor limit (20,000 here) is below that, opens
    what it can and fails the rest with ENFILE, as a full system file table would. Nothing
    hangs, already open files keep working, and once they are closed everything works."""
    import resource
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < NOPEN // NCLIENTS + 100:
        pytest.skip("the clients' descriptor limit is below what each must hold")
    spec = {f"d{i // 1000:02d}/f{i:05d}": f"#{i}\n" for i in range(NOPEN)}
    low = lower_dir(tmp_path, spec)
    for d in ("upper", "work"):
        (tmp_path / d).mkdir()
    m = target.mount([low], tmp_path / "upper", tmp_path / "work", tmp_path / "mnt")
    names = [str(m / k) for k in spec]
    per = NOPEN // NCLIENTS
    procs = []
    try:
        for c in range(NCLIENTS):
            procs.append(subprocess.Popen(
                [sys.executable, "-c", OPENER, *names[c * per:(c + 1) * per]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        reports = [p.stdout.readline().split() for p in procs]
        opened = sum(int(r[1]) for r in reports)
        assert all(r[0] == "opened" and r[3] == "0" for r in reports), reports
        errs = {}
        for r in reports:
            for kv in r[4:]:
                k, v = kv.split("=")
                errs[k] = errs.get(k, 0) + int(v)
        # while they are all held: the mount still answers
        assert sorted(os.listdir(m))[:2] == ["d00", "d01"]
        print(f"{target.impl}: {opened} opened, failures {errs}")
        if target.impl == "kernel":
            assert opened == NOPEN and not errs
        else:
            assert set(errs) <= {"ENFILE"}, errs
            assert opened >= 15_000, f"only {opened} files could be opened"
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.stdin.write("\n")
                p.stdin.flush()
        for p in procs:
            with p.stdin, p.stdout:
                assert p.stdout.readline().strip() == "closed"
            p.wait(timeout=60)
    # all closed: everything works again
    for k in list(spec)[::997]:
        assert wk.read_file(m / k) == spec[k].encode()
    assert outcome(append, m / "d00/f00000") == "ok"
    assert outcome(create, m / "d29/new") == "ok"
    assert target.alive()


# ---------------------------------------------------------------------------------------------
# load: many processes changing and listing one directory (found by the soak test)
# ---------------------------------------------------------------------------------------------

LISTER = r'''
import os, random, sys, time
d, me, until = sys.argv[1], sys.argv[2], float(sys.argv[3])
rnd = random.Random(me)
bad = n = 0
mine = set()
while time.time() < until:
    name = f"{me}_{rnd.randrange(8)}"
    p = os.path.join(d, name)
    op = rnd.random()
    if op < 0.4 and name not in mine:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x" * rnd.randrange(1, 20000))
        os.close(fd)
        mine.add(name)
    elif op < 0.7 and mine:
        src = rnd.choice(sorted(mine))
        if src != name:
            os.rename(os.path.join(d, src), p)     # (over the target, if it exists)
            mine.discard(src)
            mine.add(name)
    elif mine:
        victim = rnd.choice(sorted(mine))
        os.unlink(os.path.join(d, victim))
        mine.discard(victim)
    seen = {x for x in os.listdir(d) if x.startswith(me + "_")}
    if seen != mine:
        bad += 1
    n += 1
print(n, bad, flush=True)
'''


def test_listing_shows_own_changes_while_others_change_the_directory(tmp_path):
    """Processes that each create and remove their own names in one shared directory and
    list it after every change must always see their own last change: the kernel's cached
    listing of the directory must not outlive a change (it did, a few times a second)."""
    require_fuse()
    s = wk.Stack(tmp_path, [{"shared/lower": "x"}])
    with wk.watchdog(tmp_path, 120, "listing test"):
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt):
            until = time.time() + 10
            procs = [subprocess.Popen([sys.executable, "-c", LISTER, str(s.mnt / "shared"),
                                       f"p{i}", str(until)], stdout=subprocess.PIPE, text=True)
                     for i in range(32)]
            results = []
            for p in procs:
                with p.stdout:
                    results.append([int(x) for x in p.stdout.read().split()])
                assert p.wait(timeout=60) == 0
    ops = sum(r[0] for r in results)
    stale = sum(r[1] for r in results)
    assert ops > 1000, f"too little done to judge: {ops}"
    assert stale == 0, f"{stale} of {ops} listings missed the lister's own last change"
