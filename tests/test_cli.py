"""The overlayfs-py command as a subprocess: exit codes, one-line errors, daemonizing.

Error cases must exit non-zero with exactly one "overlayfs-py: ..." line on stderr naming
the problem, no traceback, and no new mount. The daemon protocol (parent exits 0 only once
the child reports the mount live; the child's error line otherwise) is checked with a fake
``overlayfs_py.session`` module injected into sys.modules, so it runs without FUSE.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to make mounts")


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTHONWARNINGS", None)
    if extra:
        env.update(extra)
    return env


def run_cli(args, *, cwd=None, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "overlayfs_py", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=_env(env),
                          timeout=timeout, stdin=subprocess.DEVNULL)


def mounts_under(root) -> list:
    """Mount points at or below `root`, from /proc/self/mountinfo (one entry per mount)."""
    root = str(root)
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            target = line.split(b" ")[4].decode("unicode_escape")
            if target == root or target.startswith(root.rstrip("/") + "/"):
                out.append(target)
    return out


def assert_clean_failure(res, needle, root):
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {res.stderr!r}"
    assert lines[0].startswith("overlayfs-py: "), lines[0]
    assert needle in lines[0], lines[0]
    assert res.stdout == ""


@pytest.fixture
def d(tmp_path):
    class Dirs:
        pass
    dirs = Dirs()
    for name in ("a", "b", "u", "w", "m"):
        p = tmp_path / name
        p.mkdir()
        setattr(dirs, name, p)
    (dirs.a / "hello").write_text("from a\n")
    dirs.root = tmp_path
    return dirs


def fail_case(d, args, needle, cwd=None):
    before = mounts_under(d.root)
    res = run_cli(args, cwd=cwd)
    assert_clean_failure(res, needle, d.root)
    assert mounts_under(d.root) == before, "a mount appeared"
    return res


# ------------------------------------------------------------------------------------------
# info flags


def test_version_exits_0():
    res = run_cli(["--version"])
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip().split()
    assert out[0] == "overlayfs-py" and len(out) == 2 and out[1]
    assert res.stderr == ""


def test_help_exits_0():
    res = run_cli(["--help"])
    assert res.returncode == 0 and "usage:" in res.stdout and "lowerdir" in res.stdout


# ------------------------------------------------------------------------------------------
# error cases that need no mount


def test_missing_layer(d):
    fail_case(d, ["-o", f"lowerdir={d.a}:{d.root}/nope", d.m],
              f"lower layer '{d.root}/nope' does not exist")


def test_non_dir_layer(d):
    f = d.root / "file"
    f.write_text("x")
    fail_case(d, ["-o", f"lowerdir={f}:{d.a}", d.m], f"lower layer '{f}' is not a directory")


def test_relative_missing_layer_named_as_given(d):
    fail_case(d, ["-o", "lowerdir=a:zzz", "m"], "lower layer 'zzz' does not exist", cwd=d.root)


def test_missing_upper(d):
    fail_case(d, ["-o", f"lowerdir={d.a},upperdir={d.root}/nu,workdir={d.w}", d.m],
              f"upperdir '{d.root}/nu' does not exist")


def test_upper_not_dir(d):
    f = d.root / "uf"
    f.write_text("")
    fail_case(d, ["-o", f"lowerdir={d.a},upperdir={f},workdir={d.w}", d.m],
              f"upperdir '{f}' is not a directory")


def test_missing_workdir(d):
    fail_case(d, ["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.root}/nw", d.m],
              f"workdir '{d.root}/nw' does not exist")


def test_upper_inside_lower(d):
    inner = d.a / "up"
    inner.mkdir()
    fail_case(d, ["-o", f"lowerdir={d.a},upperdir={inner},workdir={d.w}", d.m],
              f"upperdir '{inner}' is inside lower layer '{d.a}'")


def test_lower_inside_upper(d):
    inner = d.u / "lo"
    inner.mkdir()
    fail_case(d, ["-o", f"lowerdir={d.a}:{inner},upperdir={d.u},workdir={d.w}", d.m],
              f"lower layer '{inner}' is inside upperdir '{d.u}'")


def test_upper_equals_workdir(d):
    fail_case(d, ["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.u}", d.m],
              "upperdir and workdir are the same directory")


def test_workdir_inside_upper(d):
    inner = d.u / "work"
    inner.mkdir()
    fail_case(d, ["-o", f"lowerdir={d.a},upperdir={d.u},workdir={inner}", d.m],
              f"workdir '{inner}' is inside upperdir")


def test_workdir_without_upper(d):
    fail_case(d, ["-o", f"lowerdir={d.a},workdir={d.w}", d.m], "workdir given without upperdir")


def test_upper_without_workdir(d):
    fail_case(d, ["-o", f"lowerdir={d.a},upperdir={d.u}", d.m], "upperdir given without workdir")


def test_mountpoint_missing(d):
    fail_case(d, ["-o", f"lowerdir={d.a}", d.root / "nomnt"],
              f"mountpoint '{d.root}/nomnt' does not exist")


def test_mountpoint_not_dir(d):
    f = d.root / "mf"
    f.write_text("")
    fail_case(d, ["-o", f"lowerdir={d.a}", f], f"mountpoint '{f}' is not a directory")


def test_no_mountpoint(d):
    fail_case(d, ["-o", f"lowerdir={d.a}"], "missing mountpoint")


def test_no_lowerdir(d):
    fail_case(d, ["-o", f"upperdir={d.u},workdir={d.w}", d.m], "no lowerdir given")
    fail_case(d, [d.m], "no lowerdir given")


@pytest.mark.parametrize("opts,needle", [
    ("lowerdir=", "lowerdir= is empty"),
    ("lowerdir=:", "empty layer in lowerdir=':'"),
    ("lowerdir={a}::{b}", "empty layer"),
    ("lowerdir={a},upperdir={u},workdir={w},fsync=2", "bad value for mount option fsync: '2'"),
    ("lowerdir={a},uidmapping=0:100000", "bad uidmapping '0:100000'"),
    ("lowerdir={a},gidmapping=0:x:1", "bad gidmapping"),
    ("lowerdir={a},timeout=soon", "timeout"),
    ("lowerdir={a},redirect_dir=sometimes", "bad value for mount option redirect_dir"),
    ("lowerdir={a},foo", "unknown mount option 'foo'"),
    ("lowerdir={a},,,bar=1,", "unknown mount option 'bar=1'"),
    ('lowerdir={a},context="abc', "unterminated quote"),
])
def test_malformed_options(d, opts, needle):
    fail_case(d, ["-o", opts.format(a=d.a, b=d.b, u=d.u, w=d.w), d.m], needle)


def test_unknown_option_exact_line(d):
    res = fail_case(d, ["-o", f"lowerdir={d.a},foo", d.m], "foo")
    assert res.stderr == "overlayfs-py: unknown mount option 'foo'\n"


def test_unknown_flag(d):
    fail_case(d, ["--bogus", "-o", f"lowerdir={d.a}", d.m], "unknown command-line option '--bogus'")


def test_too_many_arguments(d):
    fail_case(d, ["-o", f"lowerdir={d.a}", "src", d.m, "extra"], "too many arguments")


def test_too_many_lowers(d):
    lowers = ":".join(f"{d.root}/l{i}" for i in range(501))
    fail_case(d, ["-o", f"lowerdir={lowers}", d.m], "too many lower layers (501")


def test_mount8_form_errors_too(d):
    fail_case(d, ["overlay", d.m, "-o", f"rw,lowerdir={d.root}/gone,dev,suid"],
              f"lower layer '{d.root}/gone' does not exist")


# ------------------------------------------------------------------------------------------
# error cases that need a mount (root)


def _mount(*args):
    subprocess.run(["mount", *map(str, args)], check=True, capture_output=True)


@contextlib.contextmanager
def tmpfs_at(path):
    _mount("-t", "tmpfs", "-o", "size=8m", "ovlpy-test", path)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def readonly_bind(path):
    _mount("--bind", path, path)
    try:
        _mount("-o", "remount,bind,ro", path)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.mount
@needs_root
def test_workdir_on_other_filesystem(d):
    fs2 = d.root / "fs2"
    fs2.mkdir()
    with tmpfs_at(fs2):
        w2 = fs2 / "work"
        w2.mkdir()
        before = mounts_under(d.root)
        res = run_cli(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={w2}", d.m])
        assert_clean_failure(res, f"workdir '{w2}' is not on the same filesystem as upperdir", d.root)
        assert mounts_under(d.root) == before
    assert not mounts_under(d.root)


@pytest.mark.mount
@needs_root
def test_mountpoint_already_mounted(d):
    with tmpfs_at(d.m):
        before = mounts_under(d.root)
        assert before == [str(d.m)]
        res = run_cli(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w}", d.m])
        assert_clean_failure(res, f"mountpoint '{d.m}' is already a mountpoint", d.root)
        assert mounts_under(d.root) == before
    assert not mounts_under(d.root)


@pytest.mark.mount
@needs_root
def test_upper_not_writable(d):
    with readonly_bind(d.u):
        assert not os.access(d.u, os.W_OK)
        before = mounts_under(d.root)
        res = run_cli(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w}", d.m])
        assert_clean_failure(res, f"upperdir '{d.u}' is not writable", d.root)
        assert mounts_under(d.root) == before
    assert not mounts_under(d.root)


@pytest.mark.mount
@needs_root
def test_workdir_not_writable(d):
    with readonly_bind(d.w):
        before = mounts_under(d.root)
        res = run_cli(["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w}", d.m])
        assert_clean_failure(res, f"workdir '{d.w}' is not writable", d.root)
        assert mounts_under(d.root) == before


# ------------------------------------------------------------------------------------------
# the daemon protocol, with a fake mount module (no FUSE needed)

FAKE = r'''
import json, os, sys, time, types
mod = types.ModuleType("overlayfs_py.session")
class MountError(Exception):
    pass
def _dump(path, info):
    with open(path + ".tmp", "w") as f:
        json.dump(info, f)
    os.rename(path + ".tmp", path)
def run(config, on_ready):
    mode = os.environ["FAKE_MODE"]
    rec = os.environ["FAKE_RECORD"]
    if mode == "fail":
        raise MountError("fuse: device not found, try 'modprobe fuse' first")
    if mode == "crash":
        os._exit(3)
    if mode == "bug":
        raise ValueError("boom")
    if mode == "interrupt":
        raise KeyboardInterrupt
    if mode == "return_early":
        return
    _dump(rec, dict(pid=os.getpid(), sid=os.getsid(0), cwd=os.getcwd(), ppid=os.getppid(),
                    lowers=list(config.lowers), mountpoint=config.mountpoint,
                    foreground=config.foreground))
    on_ready()
    _dump(rec + ".after", dict(stdout=os.readlink("/proc/self/fd/1"),
                               stderr=os.readlink("/proc/self/fd/2")))
    print("noise after ready", file=sys.stderr)
    deadline = time.time() + 30
    while not os.path.exists(rec + ".stop") and time.time() < deadline:
        time.sleep(0.02)
    if mode == "fail_after_ready":
        raise MountError("late failure")
mod.run = run
mod.MountError = MountError
sys.modules["overlayfs_py.session"] = mod
from overlayfs_py.cli import main
sys.exit(main(sys.argv[1:]))
'''


def run_fake(args, mode, rec, *, timeout=30):
    return subprocess.run([sys.executable, "-c", FAKE, *map(str, args)],
                          capture_output=True, text=True,
                          env=_env({"FAKE_MODE": mode, "FAKE_RECORD": str(rec)}),
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(pred, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_daemon_reports_ready_then_detaches(d, tmp_path):
    rec = tmp_path / "rec.json"
    t0 = time.time()
    # If the child kept the stderr pipe open after ready, this would hang until timeout.
    res = run_fake(["-o", f"lowerdir=a,upperdir=u,workdir=w", "m"], "ok", rec, timeout=20)
    assert time.time() - t0 < 15
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and res.stdout == ""
    info = json.loads(rec.read_text())           # written before on_ready(): must exist now
    pid = info["pid"]
    try:
        assert _alive(pid), "the daemon must still be running after the parent exits"
        assert info["sid"] == pid, "the daemon must be a session leader (setsid)"
        assert info["cwd"] == "/"
        assert info["foreground"] is False
        # paths given relative to the caller's cwd were made absolute before chdir("/")
        assert info["lowers"] == [str(d.a)] and info["mountpoint"] == str(d.m)
        after = Path(str(rec) + ".after")
        assert _wait_for(after.exists)
        stdio = json.loads(after.read_text())
        assert stdio == {"stdout": "/dev/null", "stderr": "/dev/null"}
    finally:
        Path(str(rec) + ".stop").touch()
        assert _wait_for(lambda: not _alive(pid)), "daemon did not exit"


def _fake_in(d):
    # run with cwd = d.root so the relative paths above resolve
    return ["-o", f"lowerdir={d.a},upperdir={d.u},workdir={d.w}", d.m]


@pytest.fixture(autouse=True)
def _cwd_for_fake(d, monkeypatch):
    monkeypatch.chdir(d.root)


def test_daemon_mount_error_is_reported(d, tmp_path):
    res = run_fake(_fake_in(d), "fail", tmp_path / "r")
    assert res.returncode == 1
    assert res.stderr == "overlayfs-py: fuse: device not found, try 'modprobe fuse' first\n"


def test_daemon_crash_before_ready(d, tmp_path):
    res = run_fake(_fake_in(d), "crash", tmp_path / "r")
    assert res.returncode == 1
    assert_clean_failure(res, "exited before the mount was ready (status 3)", d.root)


def test_daemon_bug_no_traceback(d, tmp_path):
    res = run_fake(_fake_in(d), "bug", tmp_path / "r")
    assert res.returncode == 1
    assert_clean_failure(res, "internal error: ValueError: boom", d.root)


def test_daemon_run_returns_without_ready(d, tmp_path):
    res = run_fake(_fake_in(d), "return_early", tmp_path / "r")
    assert_clean_failure(res, "ended before it became ready", d.root)


def test_daemon_interrupted(d, tmp_path):
    res = run_fake(_fake_in(d), "interrupt", tmp_path / "r")
    assert_clean_failure(res, "interrupted", d.root)


def test_foreground_ok_and_errors(d, tmp_path):
    rec = tmp_path / "fg"
    Path(str(rec) + ".stop").touch()             # let run() return at once
    res = run_fake(["-f", *_fake_in(d)], "ok", rec)
    assert res.returncode == 0, res.stderr
    info = json.loads(rec.read_text())
    assert info["foreground"] is True and info["pid"] != os.getpid()
    assert info["cwd"] == str(d.root)              # no chdir in the foreground
    assert "noise after ready" in res.stderr       # stdio stays attached in the foreground

    res = run_fake(["-f", *_fake_in(d)], "fail", tmp_path / "r2")
    assert res.returncode == 1
    assert res.stderr == "overlayfs-py: fuse: device not found, try 'modprobe fuse' first\n"

    res = run_fake(["-f", *_fake_in(d)], "bug", tmp_path / "r3")
    assert_clean_failure(res, "internal error: ValueError: boom", d.root)

    res = run_fake(["-f", *_fake_in(d)], "interrupt", tmp_path / "r4")
    assert_clean_failure(res, "interrupted", d.root)


def test_debug_bug_may_traceback(d, tmp_path):
    res = run_fake(["-d", *_fake_in(d)], "bug", tmp_path / "r")
    assert res.returncode != 0
    assert "ValueError: boom" in res.stderr


def test_foreground_late_failure_exit_1(d, tmp_path):
    rec = tmp_path / "late"
    Path(str(rec) + ".stop").touch()
    res = run_fake(["-f", *_fake_in(d)], "fail_after_ready", rec)
    assert res.returncode == 1 and res.stderr.endswith("overlayfs-py: late failure\n")


def test_config_errors_never_reach_mount(d, tmp_path):
    res = run_fake(["-o", f"lowerdir={d.root}/nope", d.m], "ok", tmp_path / "r")
    assert_clean_failure(res, "does not exist", d.root)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------
# the real thing, once overlayfs_py.session exists


def _have_real_mount():
    return ((REPO / "overlayfs_py" / "session.py").exists()
            and importlib.util.find_spec("pyfuse3") is not None)


def _mount_dev(mnt):
    """'major:minor' of the mount at `mnt`, from mountinfo (never stat a possibly hung mount)."""
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split(b" ")
            if fields[4].decode("unicode_escape") == str(mnt):
                return fields[2].decode()
    return None


def _daemon_pids(mnt):
    """Pids of overlayfs_py processes whose command line names this test's unique mountpoint."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"overlayfs_py" in a or b"overlayfs-py" in a for a in argv[:3]) \
                and os.fsencode(str(mnt)) in argv:
            pids.append(int(entry))
    return pids


def _unmount_fuse(mnt):
    """Unmount; if the daemon does not answer, abort its FUSE connection first."""
    try:
        ok = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True,
                            timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        ok = False
    if not ok and _mount_dev(mnt):
        minor = _mount_dev(mnt).split(":")[1]
        with contextlib.suppress(OSError):
            with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                f.write("1")
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=15)
    return ok


def _sh(cmd, timeout=20):
    """Run a shell command against the mount in a child, so a hung filesystem fails the test
    (SIGKILL on timeout) instead of hanging it."""
    try:
        return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"filesystem did not answer within {timeout}s: {cmd}")


@contextlib.contextmanager
def _real_daemon(args, mnt, cwd=None):
    res = run_cli(args, cwd=cwd, timeout=60)
    try:
        yield res
    finally:
        if _mount_dev(mnt):
            pids = _daemon_pids(mnt)
            clean = _unmount_fuse(mnt)
            gone = _wait_for(lambda: not any(_alive(p) for p in pids), timeout=15)
            for p in pids:                       # only this test's daemon, by pid
                if _alive(p):
                    with contextlib.suppress(OSError):
                        os.kill(p, 9)
            assert clean, "fusermount3 -u failed or hung (daemon not answering)"
            assert gone, "the daemon did not exit after unmount"
        assert _mount_dev(mnt) is None


@pytest.mark.mount
@needs_root
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
@pytest.mark.skipif(not _have_real_mount(), reason="overlayfs_py/session.py or pyfuse3 not available")
def test_real_daemon_mount_and_unmount(d):
    args = ["-o", f"lowerdir={d.a}:{d.b},upperdir={d.u},workdir={d.w}", d.m]
    with _real_daemon(args, d.m) as res:
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
        assert _mount_dev(d.m), "parent exited 0 before the mount was live"
        r = _sh(f"cat '{d.m}/hello'")
        assert r.stdout == "from a\n", r
        assert len(_daemon_pids(d.m)) == 1


@pytest.mark.mount
@needs_root
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
@pytest.mark.skipif(not _have_real_mount(), reason="overlayfs_py/session.py or pyfuse3 not available")
def test_real_read_only_mount_from_other_cwd(d, tmp_path):
    link = tmp_path / "alink"
    link.symlink_to(d.a)
    with _real_daemon(["-o", "lowerdir=alink:b", "m"], d.m, cwd=tmp_path) as res:
        assert res.returncode == 0, res.stderr
        assert _sh(f"cat '{d.m}/hello'").stdout == "from a\n"
        r = _sh(f"echo x > '{d.m}/new'")
        assert r.returncode != 0 and "Read-only file system" in r.stderr, r


def _console_script():
    p = Path(sys.executable).parent / "overlayfs-py"
    return p if p.exists() else None


@pytest.mark.mount
@needs_root
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
@pytest.mark.skipif(not _have_real_mount(), reason="overlayfs_py/session.py or pyfuse3 not available")
@pytest.mark.skipif(_console_script() is None or shutil.which("mount.fuse3") is None,
                    reason="needs the installed overlayfs-py script and mount.fuse3")
def test_real_mount8_helper(d):
    # mount(8) -> mount.fuse3 -> "overlayfs-py SOURCE MNT -o ...,dev,suid" (daemon mode)
    opts = f"lowerdir={d.a},upperdir={d.u},workdir={d.w},noatime"
    try:
        r = subprocess.run(["mount", "-t", "fuse", f"{_console_script()}#ovlsrc", str(d.m),
                            "-o", opts], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        with open("/proc/self/mounts") as f:
            line = next(l for l in f if f" {d.m} " in l)
        src, _, fstype, mopts = line.split()[:4]
        assert src == "ovlsrc" and fstype == "fuse.overlayfs-py"
        assert "noatime" in mopts.split(",") and "nosuid" not in mopts.split(",")
        assert _sh(f"cat '{d.m}/hello'").stdout == "from a\n"
        assert _sh(f"echo new > '{d.m}/g'").returncode == 0
        assert (d.u / "g").read_text() == "new\n"
    finally:
        if _mount_dev(d.m):
            pids = _daemon_pids(d.m)
            assert len(pids) == 1, pids
            assert _unmount_fuse(d.m)
            assert _wait_for(lambda: not any(_alive(p) for p in pids), timeout=15)
    assert _mount_dev(d.m) is None
