"""Kernel-side tuning the daemon applies to its own mount."""
from __future__ import annotations

import os
import time
from typing import List, Optional

import pytest

import writekit as wk
from conftest import fuse_only

pytestmark = pytest.mark.mount


def _bdi(mnt: str) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mnt:
                return fields[2]
    raise AssertionError(f"{mnt} not in mountinfo")


def test_read_ahead_is_raised_after_init(make_layers, mounted):
    """The bdi read-ahead must be set after INIT: the kernel lowers it to the INIT reply's
    value (the 128 KiB it offered at mount time), undoing an earlier write. And it must be set
    by the time the first request is answered: a file keeps the read-ahead it was opened with,
    and the first thing anyone does on a fresh mount may be opening a big file."""
    fuse_only("the kernel overlay has no bdi of its own")
    if wk.is_fuse_overlayfs():
        pytest.skip("overlayfs-py's tuning")
    from overlayfs_py.ops import READ_AHEAD_KB
    m = mounted(make_layers({"f": "x"}))
    os.stat(os.path.join(wk.mp(m), "f"))              # the first request after INIT
    with open(f"/sys/class/bdi/{_bdi(wk.mp(m))}/read_ahead_kb") as f:
        assert int(f.read()) == READ_AHEAD_KB


def test_node_table_is_trimmed_on_big_trees(make_layers, mounted, tmp_path):
    """Past max_nodes the daemon asks the kernel to forget unused files of the least recently
    listed directories, and the kernel does (FORGET); everything stays correct after."""
    fuse_only("counts the daemon's requests")
    if wk.is_fuse_overlayfs():
        pytest.skip("overlayfs-py's node table")
    import re
    import subprocess
    import sys
    spec = {f"d{i // 40}/f{i}": f"{i}\n" for i in range(6000)}
    stack = make_layers(spec, {"d0/low": "low\n"}, upper=True)
    m = mounted(stack, options=("max_nodes=1000",), prog=f"{sys.executable} -m overlayfs_py -d")
    mnt = wk.mp(m)
    # a process whose working directory is in the tree must keep it through the trimming
    cwd = os.path.join(mnt, "d0")
    sitter = subprocess.Popen(
        [sys.executable, "-c", "import os, sys, time; os.chdir(sys.argv[1]); time.sleep(3); "
         "print(os.getcwd()); print(sorted(os.listdir('.'))[:2])", cwd],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    subprocess.run(["du", "-s", mnt], check=True, capture_output=True)

    def forgotten():
        return len(re.findall(r"\(\d+, \d+\)", "".join(
            line for line in m.log().splitlines() if "-> forget(" in line)))
    deadline = time.monotonic() + 10
    while forgotten() < 4000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "trim: " in m.log()
    out, err = sitter.communicate(timeout=20)
    assert sitter.returncode == 0, err
    assert out.splitlines() == [cwd, "['f0', 'f1']"]
    assert forgotten() >= 4000, "the kernel did not forget the trimmed directories"
    # trimmed directories are looked up and listed again, unchanged
    out = subprocess.run(["find", mnt, "-type", "f"], check=True, capture_output=True).stdout
    assert len(out.splitlines()) == 6001
    assert wk.read_file(os.path.join(mnt, "d0/f7")) == b"7\n"
    with open(os.path.join(mnt, "d0/f7"), "a") as f:
        f.write("more\n")
    assert wk.read_file(os.path.join(stack.upper, "d0/f7")) == b"7\nmore\n"
    assert wk.read_file(os.path.join(mnt, "d0/low")) == b"low\n"


POLL = 7     # x86_64


def _main_thread_syscall_fields(pid: int) -> List[str]:
    """The daemon's main thread in /proc: ["running"], or the system call it is blocked in
    (its number, then its arguments in hex)."""
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()


def _main_thread_syscall(pid: int) -> int:
    """Number of the system call the daemon's main thread is blocked in (-1: running)."""
    first = _main_thread_syscall_fields(pid)[0]
    return -1 if first == "running" else int(first)


def _main_thread_poll_timeout(pid: int) -> Optional[int]:
    """The timeout (ms) of the poll(2) the daemon's main thread is in; -1 if it is running
    (spinning between two polls), None if it is in another system call."""
    fields = _main_thread_syscall_fields(pid)
    if fields[0] == "running":
        return -1
    return int(fields[3], 16) if int(fields[0]) == POLL else None


def _patched_pyfuse3(level: int = 2) -> None:
    fuse_only("the daemon's request loop")
    if wk.is_fuse_overlayfs():
        pytest.skip("overlayfs-py's request loop")
    import platform
    if platform.machine() != "x86_64":
        pytest.skip("system call numbers of x86_64")
    import pyfuse3
    if getattr(pyfuse3, "OVERLAYFS_PY_PATCH", 0) < level:
        pytest.skip(f"stock pyfuse3 or patch level < {level} (vendor/pyfuse3)")


def test_idle_daemon_waits_in_poll_not_in_trio(make_layers, mounted):
    """With nothing else pending, the worker waits for the next request in poll(2) with the
    GIL released (vendor/pyfuse3, patch 3), not in trio's epoll loop: two scheduler passes
    and an epoll round trip less per request."""
    _patched_pyfuse3()
    EPOLL_WAIT, EPOLL_PWAIT = 232, 281
    m = mounted(make_layers({f"d/f{i}": "x" for i in range(50)}))
    for name in os.listdir(os.path.join(wk.mp(m), "d")):
        os.stat(os.path.join(wk.mp(m), "d", name))
    seen = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        nr = _main_thread_syscall(m.pid)
        seen.add(nr)
        if nr == POLL:
            break
        time.sleep(0.05)
    assert POLL in seen, f"idle daemon's main thread in syscalls {sorted(seen)}, not poll " \
                         f"(epoll_wait={EPOLL_WAIT}, epoll_pwait={EPOLL_PWAIT})"


def test_signal_ends_a_daemon_idling_in_poll(make_layers, mounted):
    """SIGTERM interrupts the poll (EINTR); trio's signal handler must then run and unmount,
    and the daemon must exit 0 -- not sit in poll until the next request."""
    _patched_pyfuse3()
    import signal
    m = mounted(make_layers({"f": "x"}))
    os.stat(os.path.join(wk.mp(m), "f"))
    time.sleep(0.2)                                   # let it settle in its idle wait
    os.kill(m.pid, signal.SIGTERM)
    _assert_exits_cleanly(m)


def _poll_timeouts(pid: int, seconds: float) -> List[Optional[int]]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        out.append(_main_thread_poll_timeout(pid))
        time.sleep(0.005)
    return out


def _wait_asleep(pid: int) -> None:
    """Until the main thread sleeps in poll (timeout 1000 ms): any spin has ended."""
    deadline = time.monotonic() + 10
    while _main_thread_poll_timeout(pid) != 1000:
        assert time.monotonic() < deadline, "the daemon never went to sleep in poll"
        time.sleep(0.01)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spin is off on one CPU")
def test_worker_spins_for_spin_us_after_a_request_then_sleeps(make_layers, mounted):
    """After a request the worker polls the FUSE fd without sleeping (poll timeout 0) for
    spin_us, so a client that sends its next request at once needs no wakeup of the
    daemon; then it sleeps in poll. A spin of 1.5 s makes both phases visible."""
    _patched_pyfuse3(level=4)
    m = mounted(make_layers({"f": "x", "g": "y"}), options=("spin_us=1500000",))
    _wait_asleep(m.pid)
    os.stat(os.path.join(wk.mp(m), "f"))
    spinning = _poll_timeouts(m.pid, 0.5)
    assert 1000 not in spinning, f"asleep right after a request: {spinning}"
    assert {0, -1} & set(spinning), f"no spin seen: {spinning}"
    t0 = _cpu_seconds(m.pid)
    _wait_asleep(m.pid)                    # the spin is bounded ...
    time.sleep(1.0)
    t1 = _cpu_seconds(m.pid)
    time.sleep(1.0)
    assert _cpu_seconds(m.pid) - t1 < 0.2, "the daemon burns CPU while idle"
    assert t1 - t0 < 2.5


def test_spin_us_0_sleeps_at_once(make_layers, mounted):
    """spin_us=0: the worker goes straight to sleep after each request."""
    _patched_pyfuse3(level=4)
    m = mounted(make_layers({"f": "x"}), options=("spin_us=0",))
    _wait_asleep(m.pid)
    os.stat(os.path.join(wk.mp(m), "f"))
    seen = _poll_timeouts(m.pid, 0.3)
    assert seen and all(t == 1000 for t in seen if t is not None and t >= 0), seen
    assert 0 not in seen, seen


def test_spin_is_off_on_a_single_cpu(monkeypatch):
    from overlayfs_py.config import Config
    from overlayfs_py.session import poll_spin_ns
    cfg = Config(lowers=("/",), mountpoint="/mnt")
    assert cfg.spin_us == 50
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert poll_spin_ns(cfg) == 50_000
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert poll_spin_ns(cfg) == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spin is off on one CPU")
def test_signal_during_a_spin_ends_the_daemon(make_layers, mounted):
    """SIGTERM while the worker spins: the poll(0) it is in returns EINTR (or the next one
    does), trio's handler runs, and the daemon unmounts and exits 0."""
    _patched_pyfuse3(level=4)
    import signal
    m = mounted(make_layers({"f": "x"}), options=("spin_us=1000000",))
    _wait_asleep(m.pid)
    os.stat(os.path.join(wk.mp(m), "f"))
    time.sleep(0.2)                                  # well inside the 1 s spin
    assert _main_thread_poll_timeout(m.pid) in (0, -1), "not spinning"
    os.kill(m.pid, signal.SIGTERM)
    _assert_exits_cleanly(m)


def test_signal_that_misses_the_poll_is_handled_within_a_second(make_layers, mounted):
    """A signal can arrive after the worker's last check and before it sleeps: then it
    interrupts nothing. Made deterministic here by sending it to another thread of the
    daemon (one the fsync handler started), where Python's C handler only sets a flag; the
    main thread's poll is not interrupted. The sleep is bounded (1 s), and the check after it
    runs trio's handler. With an unbounded sleep the daemon would wait for a next request."""
    _patched_pyfuse3(level=4)
    import ctypes
    import signal
    m = mounted(make_layers({"f": "x"}, upper=True))
    fd = os.open(os.path.join(wk.mp(m), "g"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"data")
        os.fsync(fd)                                 # a worker thread does the fsync
    finally:
        os.close(fd)
    others = [int(t) for t in os.listdir(f"/proc/{m.pid}/task") if int(t) != m.pid]
    assert others, "no worker thread to send the signal to"
    _wait_asleep(m.pid)
    SYS_tgkill = 234                                 # x86_64
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(SYS_tgkill, m.pid, others[0], signal.SIGTERM) == 0, ctypes.get_errno()
    _assert_exits_cleanly(m)


def _assert_exits_cleanly(m) -> None:
    deadline = time.monotonic() + 10
    while m.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert m.proc.returncode == 0, f"daemon still running or failed: {m.proc.returncode}"
    assert not os.path.ismount(wk.mp(m))


def _stats_of_a_mount(stack, tmp_path, client, options=()) -> dict:
    """Mount ``stack`` with OVERLAYFS_PY_STATS, run ``client(mountpoint)``, unmount, and
    return the statistics the daemon wrote (stats.py), checking they are its own file."""
    import json
    import sys
    import layerkit
    out = tmp_path / "stats"
    (tmp_path / "mnt").mkdir()
    env = dict(os.environ, OVERLAYFS_PY_STATS=str(out))
    with layerkit.fuse_mount(f"{sys.executable} -m overlayfs_py", stack.lowers, stack.upper,
                             stack.work, tmp_path / "mnt", env=env, options=options) as m:
        client(m.path)
        pid = m.proc.pid
    (path,) = out.glob("stats-*.json")
    assert path.name == f"stats-{pid}.json"
    return json.loads(path.read_text())


def _getxattrs(path: str, n: int, gap: float) -> None:
    for _ in range(n):
        try:
            os.getxattr(path, "security.capability")      # always a request: no xattr cache
        except OSError:
            pass
        time.sleep(gap)


def test_request_statistics_at_unmount(make_layers, tmp_path):
    """OVERLAYFS_PY_STATS=DIR: the daemon writes its per-request-type counts at unmount
    (overlayfs_py/stats.py), and they count what was asked."""
    fuse_only("the daemon's own statistics")
    if wk.is_fuse_overlayfs():
        pytest.skip("overlayfs-py's statistics")

    def client(mnt):
        d = os.path.join(mnt, "d")
        _getxattrs(os.path.join(d, "f"), 3, 0)
        assert sorted(os.listdir(d)) == ["f", "g"]
        with open(os.path.join(d, "new"), "w") as f:
            f.write("z")
    stack = make_layers({"d/f": "x", "d/g": "y"}, upper=True)
    rep = _stats_of_a_mount(stack, tmp_path, client)
    ops = rep["ops"]
    # every probe is a request (FUSE caches no xattrs), and so is the kernel's own before
    # the write
    caps = rep["detail"]["getxattr security.capability"]
    assert caps >= 3 and ops["getxattr"]["count"] == caps == ops["getxattr"]["errors"]
    assert ops["create"]["count"] == 1 and ops["create"]["errors"] == 0
    assert ops["readdir"]["count"] >= 1
    assert rep["requests"] == sum(o["count"] for o in ops.values())
    assert rep["start"] <= rep["init"] <= rep["first_request"] <= rep["last_request"] <= rep["end"]
    assert rep["mountpoint"] == str(tmp_path / "mnt") and rep["layers"] == 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the spin is off on one CPU")
def test_spin_statistics_count_hits_and_misses(make_layers, tmp_path):
    """pyfuse3 patch 0013: OVERLAYFS_PY_STATS says what the idle worker's spin did. A 10 ms
    spin makes the client's pace easy to set: 25 ms between requests is too slow for it (a
    miss each), 1 ms is within it (a hit each)."""
    _patched_pyfuse3(level=13)

    def client(mnt):
        _getxattrs(os.path.join(mnt, "f"), 20, 0.025)
        _getxattrs(os.path.join(mnt, "f"), 100, 0.001)
    spin = _stats_of_a_mount(make_layers({"f": "x"}), tmp_path, client,
                             ("spin_us=10000",))["spin"]
    mount_noise = 6                     # INIT, the first lookups and the unmount's requests
    assert 20 - mount_noise <= spin["misses"] <= 20 + mount_noise, spin
    assert spin["hits"] >= 100 - mount_noise, spin
