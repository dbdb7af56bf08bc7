"""Crash consistency: ``kill -9`` of the daemon in the middle of copy-ups and writes.

Several threads append records to lower files (each append copies the file up first, then
is fsync'd and only then counted as acknowledged), create new files and replace files by
rename. The daemon is killed at some point, the dead mount lazily unmounted, and the same
layers mounted again (the workdir is left as the crash left it). Then:

- every lower file reads as its full lower content followed by the records of that file,
  in order, at least all acknowledged ones and at most one more (the one in flight);
  the same holds for its copy in the upper, if there is one: no partial copy-up;
- every acknowledged new file or rename target exists with its full content;
- neither the merged view nor the upper dir shows any other name (no temp files);
- the remounted filesystem works and unmounts cleanly.

``test_kill9_at_named_step`` stops the daemon at named steps of multi-step operations
(rename over a lower file, rmdir of a merged dir, mkdir over a whiteout, metacopy data
fill-in) through its kill points (``overlayfs_py/faultpoint.py``) instead of a timer, and
checks that the remounted tree is the state before or after the operation, never a mix.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest

import layerkit
import writekit as wk
from conftest import fuse_only, require_fuse

pytestmark = [pytest.mark.mount, pytest.mark.slow]

NFILES = 24
NTHREADS = 4


def lower_content(i):
    size = [100, 5000, 70_000, 1 << 20, 3 << 20][i % 5]
    return random.Random(i).randbytes(size)


def record(name, seq):
    return f"<{name}:{seq:05d}>\n".encode()


class Storm:
    def __init__(self, mnt):
        self.mnt = Path(mnt)
        self.stop = threading.Event()
        self.acked = {}            # lower name -> number of acknowledged records
        self.inflight = {}         # lower name -> records attempted (acked or not)
        self.new_acked = {}        # created name -> content
        self.new_tried = {}        # created name -> content (maybe not acknowledged)
        self.renamed_acked = {}    # rename target -> content
        self.renamed_tried = {}
        self.errors = []
        self.lock = threading.Lock()

    def worker(self, t):
        mnt = self.mnt
        k = 0
        try:
            while not self.stop.is_set():
                for i in range(t, NFILES, NTHREADS):
                    name = f"f{i:02d}"
                    seq = self.inflight.get(name, 0)
                    self.inflight[name] = seq + 1
                    fd = os.open(mnt / "d" / name, os.O_WRONLY | os.O_APPEND)
                    try:
                        os.write(fd, record(name, seq))
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    self.acked[name] = seq + 1
                    # a new file
                    nn = f"n_{t}_{k}"
                    data = (nn.encode() + b"\n") * (1 + k % 50)
                    self.new_tried[nn] = data
                    wk.write_file(mnt / "new" / nn, data, fsync=True)
                    self.new_acked[nn] = data
                    # write + rename (the atomic replace pattern)
                    rn = f"r_{t}_{k % 3}"
                    data = f"{rn} version {k}\n".encode()
                    self.renamed_tried.setdefault(rn, []).append(data)
                    wk.write_file(mnt / "new" / f"tmp_{t}", data, fsync=True)
                    os.rename(mnt / "new" / f"tmp_{t}", mnt / "new" / rn)
                    self.renamed_acked[rn] = data
                    k += 1
                    if self.stop.is_set():
                        break
        except OSError as e:
            # expected once the daemon is dead (ENOTCONN, ECONNABORTED); recorded anyway
            with self.lock:
                self.errors.append(e)


def _check_lower_file(data, where, name, lower, acked, tried):
    assert data.startswith(lower), \
        f"{where}: does not start with its lower content (len {len(data)} vs {len(lower)})"
    rest = data[len(lower):]
    ok = [b"".join(record(name, s) for s in range(n)) for n in range(acked, tried + 1)]
    assert rest in ok, (f"{where}: appended part is not the acknowledged records "
                        f"(acked {acked}, tried {tried}): {rest[-200:]!r}")


@pytest.mark.parametrize("delay", [0.4, 1.5, 3.0])
def test_kill9_during_copyup_storm(tmp_path, delay):
    require_fuse()
    fuse_only("kills the FUSE daemon")
    lowers = {f"d/f{i:02d}": lower_content(i) for i in range(NFILES)}
    lowers["new/"] = layerkit.DIR
    s = wk.Stack(tmp_path, [lowers], "s")
    storm = None
    with wk.watchdog(tmp_path, 240, "crash test"):
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt,
                                 check_exit=False) as fm:
            storm = Storm(s.mnt)
            threads = [threading.Thread(target=storm.worker, args=(t,), daemon=True)
                       for t in range(NTHREADS)]
            for th in threads:
                th.start()
            time.sleep(delay)
            wk.kill9(fm)
            storm.stop.set()
            for th in threads:
                th.join(timeout=30)
            assert not any(th.is_alive() for th in threads), "writers stuck after kill -9"
        assert sum(storm.acked.values()) > 0, "nothing was acknowledged before the kill"

        # the upper, as the crash left it
        upper_names = set(wk.tree_paths(s.upper))
        allowed = ({"d", "new"} | {f"d/f{i:02d}" for i in range(NFILES)}
                   | {f"new/{n}" for n in storm.new_tried}
                   | {f"new/{n}" for n in storm.renamed_tried}
                   | {f"new/tmp_{t}" for t in range(NTHREADS)})
        assert upper_names <= allowed, f"unexpected names in the upper: {upper_names - allowed}"
        for i in range(NFILES):
            name = f"f{i:02d}"
            up = s.upper / "d" / name
            if os.path.lexists(up):
                _check_lower_file(wk.read_file(up), f"upper d/{name}", name, lowers[f"d/{name}"],
                                  storm.acked.get(name, 0), storm.inflight.get(name, 0))

        # remount on the same upper and workdir
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt) as fm2:
            m = s.mnt
            assert sorted(os.listdir(m / "d")) == [f"f{i:02d}" for i in range(NFILES)]
            for i in range(NFILES):
                name = f"f{i:02d}"
                _check_lower_file(wk.read_file(m / "d" / name), f"merged d/{name}", name,
                                  lowers[f"d/{name}"], storm.acked.get(name, 0),
                                  storm.inflight.get(name, 0))
            names = set(os.listdir(m / "new"))
            tmp_names = {f"tmp_{t}" for t in range(NTHREADS)}
            assert names <= set(storm.new_tried) | set(storm.renamed_tried) | tmp_names, \
                f"unexpected names in the merged view: {names - set(storm.new_tried)}"
            for n, data in storm.new_acked.items():
                assert wk.read_file(m / "new" / n) == data, f"acknowledged new/{n} lost"
            for n in names & set(storm.new_tried):
                got = wk.read_file(m / "new" / n)
                assert got in (b"", storm.new_tried[n]), f"new/{n}: torn content {got[:80]!r}"
            for n, data in storm.renamed_acked.items():
                got = wk.read_file(m / "new" / n)
                versions = storm.renamed_tried[n]
                assert got in versions[versions.index(data):], \
                    f"rename target new/{n}: {got!r}, acknowledged {data!r}"
            # it still works
            with open(m / "d/f00", "ab") as f:
                f.write(b"after remount\n")
            wk.write_file(m / "new/after", b"ok", fsync=True)
            assert wk.read_file(m / "new/after") == b"ok"
            assert fm2.proc.poll() is None


@pytest.mark.parametrize("delay", [0.02, 0.1, 0.3])
def test_kill9_during_big_copyup(tmp_path, delay):
    """Kill while one big file is being copied up: afterwards the upper holds either no
    copy or a complete one, and the merged view shows the whole file."""
    require_fuse()
    fuse_only("kills the FUSE daemon")
    big = random.Random(7).randbytes(96 << 20)
    s = wk.Stack(tmp_path, [{"big": big, "small": "s\n"}], "s")
    with wk.watchdog(tmp_path, 240, "crash test"):
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt,
                                 check_exit=False) as fm:
            opened = []

            def opener():
                with contextlib.suppress(OSError):
                    fd = os.open(s.mnt / "big", os.O_WRONLY | os.O_APPEND)
                    opened.append(True)
                    os.write(fd, b"TAIL")
                    os.fsync(fd)
                    opened.append("acked")
                    os.close(fd)

            th = threading.Thread(target=opener, daemon=True)
            th.start()
            time.sleep(delay)
            wk.kill9(fm)
            th.join(timeout=30)
            assert not th.is_alive()
        names = set(wk.tree_paths(s.upper))
        assert names <= {"big"}, f"unexpected names in the upper: {names}"
        if "big" in names:
            data = wk.read_file(s.upper / "big")
            assert data in (big, big + b"TAIL"), \
                f"partial copy-up visible in the upper: {len(data)} of {len(big)} bytes"
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt):
            data = wk.read_file(s.mnt / "big")
            ok = (big + b"TAIL",) if "acked" in opened else (big, big + b"TAIL")
            assert data in ok, f"merged big: {len(data)} bytes (lower {len(big)})"
            assert os.listdir(s.mnt) == ["big", "small"] or \
                sorted(os.listdir(s.mnt)) == ["big", "small"]


RENAME_WORKER = r'''
import os, sys
mnt, t, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("ready", flush=True)
for i in range(t, n, 3):
    src = os.path.join(mnt, "d", f"f{i:03d}")
    print("start", i, flush=True)
    if i % 3 == 0:
        os.rename(src, os.path.join(mnt, "moved", f"f{i:03d}"))
    elif i % 3 == 1:
        os.unlink(src)
    else:
        os.rename(src, os.path.join(mnt, "d", f"g{i:03d}"))
    print("done", i, flush=True)
'''


@pytest.mark.parametrize("delay", [0.05, 0.3, 1.0])
def test_kill9_during_renames_and_unlinks_of_lower_files(tmp_path, delay):
    """rename(2) and unlink(2) of lower files are atomic across a crash: each file is
    afterwards either untouched or completely moved / deleted -- never visible under both
    names, never gone from both, never a partial copy."""
    require_fuse()
    fuse_only("kills the FUSE daemon")
    import subprocess
    import sys
    n = 150
    contents = {i: random.Random(i).randbytes([10, 300_000, 2_000_000][i % 3] + i)
                for i in range(n)}
    spec = {f"d/f{i:03d}": contents[i] for i in range(n)}
    spec["moved/"] = layerkit.DIR
    s = wk.Stack(tmp_path, [spec], "s")
    with wk.watchdog(tmp_path, 240, "crash test"):
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt,
                                 check_exit=False) as fm:
            procs = [subprocess.Popen([sys.executable, "-c", RENAME_WORKER, str(s.mnt), str(t),
                                       str(n)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL)   # (they die with ENOTCONN)
                     for t in range(3)]
            for p in procs:
                assert p.stdout.readline() == b"ready\n"
            time.sleep(delay)
            wk.kill9(fm)
            # (read through the same buffered reader as readline(): communicate(timeout=..)
            # would read the raw pipe and lose what the buffer already holds)
            outs = []
            for p in procs:
                with p.stdout:
                    outs.append(p.stdout.read().decode())
                p.wait(timeout=60)
        started = {int(line.split()[1]) for o in outs for line in o.splitlines()
                   if line.startswith("start")}
        done = {int(line.split()[1]) for o in outs for line in o.splitlines()
                if line.startswith("done")}
        assert done, "nothing completed before the kill"
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt):
            m = s.mnt
            d_names, moved_names = set(os.listdir(m / "d")), set(os.listdir(m / "moved"))
            problems = []
            for i in range(n):
                old = f"f{i:03d}" in d_names
                new = {0: f"f{i:03d}" in moved_names, 1: False,
                       2: f"g{i:03d}" in d_names}[i % 3]
                newpath = {0: m / "moved" / f"f{i:03d}", 2: m / "d" / f"g{i:03d}"}.get(i % 3)
                if i in done:
                    ok = (not old) and (new or i % 3 == 1)
                elif i in started:
                    ok = (old != new) if i % 3 != 1 else True
                else:
                    ok = old and not new
                if not ok:
                    problems.append(f"f{i:03d} ({['rename to moved/', 'unlink', 'rename to g'][i % 3]}"
                                    f", {'done' if i in done else 'in flight' if i in started else 'not started'})"
                                    f": old name {'present' if old else 'absent'}, new name "
                                    f"{'present' if new else 'absent'}")
                for present, path in ((old, m / "d" / f"f{i:03d}"), (new, newpath)):
                    if present and wk.read_file(path) != contents[i]:
                        problems.append(f"{path.relative_to(m)}: content differs from f{i:03d}")
            extra = (d_names - {f"f{i:03d}" for i in range(n)} - {f"g{i:03d}" for i in range(n)}) \
                | (moved_names - {f"f{i:03d}" for i in range(n)})
            if extra:
                problems.append(f"unexpected names: {sorted(extra)}")
            assert not problems, "\n".join(problems)


RMDIR_WORKER = r'''
import os, sys
mnt, n = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
for i in range(n):
    d = os.path.join(mnt, "t", f"d{i:03d}")
    for j in range(3):
        os.unlink(os.path.join(d, f"f{j}"))
        print("unlinked", i, j, flush=True)
    os.rmdir(d)
    print("rmdir", i, flush=True)
    os.mkdir(d)                       # over the whiteout: opaque
    print("mkdir", i, flush=True)
'''


@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_kill9_during_rmdir_of_lower_dirs(tmp_path, delay):
    """unlink, rmdir of emptied lower dirs, mkdir over their whiteouts, killed midway:
    afterwards every acknowledged step is there, and each dir is in one of the states its
    steps go through (never showing lower files again once it was recreated)."""
    require_fuse()
    fuse_only("kills the FUSE daemon")
    import subprocess
    import sys
    n = 120
    spec = {f"t/d{i:03d}/f{j}": f"{i}.{j}" for i in range(n) for j in range(3)}
    s = wk.Stack(tmp_path, [spec, {f"t/d{i:03d}/f{j}": "below" for i in range(n)
                                   for j in range(3)}], "s")
    with wk.watchdog(tmp_path, 240, "crash test"):
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt,
                                 check_exit=False) as fm:
            p = subprocess.Popen([sys.executable, "-c", RMDIR_WORKER, str(s.mnt), str(n)],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert p.stdout.readline() == b"ready\n"
            time.sleep(delay)
            wk.kill9(fm)
            with p.stdout:
                out = p.stdout.read().decode().splitlines()
            p.wait(timeout=60)
        unlinked = {(int(x.split()[1]), int(x.split()[2])) for x in out
                    if x.startswith("unlinked")}
        rmdired = {int(x.split()[1]) for x in out if x.startswith("rmdir")}
        mkdired = {int(x.split()[1]) for x in out if x.startswith("mkdir")}
        assert unlinked, "nothing acknowledged before the kill"
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt):
            problems = []
            for i in range(n):
                d = s.mnt / "t" / f"d{i:03d}"
                exists = os.path.isdir(d)
                names = sorted(os.listdir(d)) if exists else None
                if i in mkdired:
                    ok = names == []
                elif i in rmdired or all((i, j) in unlinked for j in range(3)):
                    ok = names in (None, [])          # (an unacknowledged rmdir may be done)
                else:
                    gone = {f"f{j}" for j in range(3) if (i, j) in unlinked}
                    ok = exists and not (gone & set(names)) and \
                        len(set(names) | gone) >= 2 and set(names) <= {"f0", "f1", "f2"}
                    for nm in names or []:
                        if wk.read_file(d / nm).decode() != f"{i}.{nm[1]}":
                            problems.append(f"d{i:03d}/{nm}: content {wk.read_file(d / nm)!r}")
                if not ok:
                    problems.append(f"d{i:03d}: shows {names}; acknowledged: unlinked "
                                    f"{sorted(j for (k, j) in unlinked if k == i)}, "
                                    f"rmdir {i in rmdired}, mkdir {i in mkdired}")
            assert not problems, "\n".join(problems[:20])


# ---------------------------------------------------------------------------------------------
# kill -9 at named steps (overlayfs_py/faultpoint.py), not at a time
# ---------------------------------------------------------------------------------------------

KILL_ENV = "OVERLAYFS_PY_KILL_AT"


def _metacopy_prep(m):
    os.chmod(m / "big", 0o600)            # a metadata-only copy (metacopy=on)


def _metacopy_act(m):
    with open(m / "big", "ab") as f:      # the first write fills in the data
        f.write(b"tail")


# id -> (lower specs top first, upper spec, mount options, prepare(mnt), act(mnt), steps)
KILL_CASES = {
    # rename over a lower file in another directory: copy-up of the source, then one
    # renameat2(RENAME_WHITEOUT) that moves it over the target and leaves a whiteout behind
    "rename-over-lower": (
        [{"d/a": "A\n" * 1000, "e/c": "C\n", "e/keep": "k"}], None, (),
        None, lambda m: os.rename(m / "d/a", m / "e/c"),
        ["copyup.staged", "rename.before", "rename.after"]),
    # rmdir of a directory merged from two lower layers (emptied by whiteouts): the upper
    # directory is exchanged with a whiteout, then deleted in the workdir
    "rmdir-merged": (
        [{"m/x": "1", "keep": "k"}, {"m/y": "2", "m/z/deep": "3"}],
        {"m/x": layerkit.WHITEOUT, "m/y": layerkit.WHITEOUT, "m/z": layerkit.WHITEOUT}, (),
        None, lambda m: os.rmdir(m / "m"),
        ["whiteout.staged", "whiteout.exchanged"]),
    # mkdir where a whiteout hides a lower directory: built in the workdir, marked opaque,
    # exchanged with the whiteout
    "mkdir-over-whiteout": (
        [{"d/sub/f": "lower f", "d/sub/g/h": "lower h", "d/other": "o"}],
        {"d/sub": layerkit.WHITEOUT}, (),
        None, lambda m: os.mkdir(m / "d/sub", 0o750),
        ["mkdir.staged", "mkdir.opaque", "mkdir.exchanged"]),
    # metacopy=on: the first write to a metadata-only copy fills its data in place, then
    # drops the metacopy xattr
    "metacopy-fill": (
        [{"big": random.Random(3).randbytes(3 << 20), "small": "s"}], None, ("metacopy=on",),
        _metacopy_prep, _metacopy_act,
        ["metacopy.filled", "metacopy.done"]),
}


def _kill_case_states(tmp_path, case):
    """(before, after) merged snapshots of the case, from a run without a kill point."""
    lowers, upper, opts, prep, act, _ = KILL_CASES[case]
    s = wk.Stack(tmp_path, lowers, "ref", upper_spec=upper)
    with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt, opts):
        if prep:
            prep(s.mnt)
        before = wk.merged_snapshot(s.mnt)
        act(s.mnt)
        after = wk.merged_snapshot(s.mnt)
    assert before != after, "the operation changes nothing: the test could not fail"
    return before, after


_STATES = {}


@pytest.mark.parametrize("case,step", [(c, st) for c, v in KILL_CASES.items() for st in v[5]])
def test_kill9_at_named_step(tmp_path, case, step):
    """The daemon is SIGKILLed by its own kill point at ``step`` of the operation. After a
    remount on the same upper and workdir the merged view is exactly the state before the
    operation or the state after it (never a mix), the upper holds no temporary, and the
    kernel overlay mounted on that upper shows the same tree."""
    require_fuse()
    fuse_only("kills the FUSE daemon")
    lowers, upper, opts, prep, act, _ = KILL_CASES[case]
    if case not in _STATES:
        _STATES[case] = _kill_case_states(tmp_path, case)
    before, after = _STATES[case]
    s = wk.Stack(tmp_path, lowers, "s", upper_spec=upper)
    env = dict(os.environ, **{KILL_ENV: step})
    with wk.watchdog(tmp_path, 120, "kill-point test"):
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt, opts, env=env,
                                 check_exit=False) as fm:
            if prep:
                prep(s.mnt)
            err = []

            def run():
                try:
                    act(s.mnt)
                except OSError as e:
                    err.append(e)
            th = threading.Thread(target=run, daemon=True)
            th.start()
            th.join(60)
            assert not th.is_alive(), "the operation hangs after the kill"
            rc = fm.proc.wait(timeout=30)
            assert rc == -9, f"the daemon did not stop at {step} (exit {rc}):\n{fm.log()}"
            assert err and err[0].errno in (errno.ENOTCONN, errno.ECONNABORTED), err
            wk.kill9(fm)                                # lazy unmount of the dead mount
        stray = [p for p in wk.tree_paths(s.upper) if os.path.basename(p).startswith("#")]
        assert not stray, f"workdir temporaries in the upper: {stray}"
        with layerkit.fuse_mount(None, s.lowers, s.upper, s.work, s.mnt, opts):
            got = wk.merged_snapshot(s.mnt)
        assert os.listdir(s.work / "work") == [], "stale temporaries kept after a remount"
        if got != before and got != after:
            diff_b = wk.diff_snapshots(before, got, "before", "got")
            diff_a = wk.diff_snapshots(after, got, "after", "got")
            pytest.fail(f"kill at {step}: neither the state before nor after:\n  vs before: "
                        + "\n    ".join(diff_b) + "\n  vs after: " + "\n    ".join(diff_a))
        # the kernel overlay reads the upper as the crash left it in the same way
        if layerkit.kernel_overlay_available():
            klowers = s.kernel_lowers()
            s.reset_work()
            kopts = wk.KERNEL_OPTS if "metacopy=on" not in opts else \
                ("metacopy=on",)
            with contextlib.ExitStack() as ex:
                kmnt = s.mount_kernel(ex, options=kopts, lowers=klowers)
                kernel = wk.merged_snapshot(kmnt)
            assert kernel == got, "kernel overlay on the crashed upper:\n" + \
                "\n".join(wk.diff_snapshots(kernel, got, "kernel", "ours"))
