"""Several processes writing, renaming and deleting in the same directories at once.

Only the errors a race legitimately produces are accepted (ENOENT when another process
removed the name first, EEXIST / ENOTEMPTY for racing mkdir / rmdir); everything must
finish within a timeout (no deadlock); afterwards the tree is what the operations that
succeeded imply, the daemon still answers, and the upper it left reads the same through a
remount and through the kernel overlay.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
import time

import pytest

import layerkit
import writekit as wk
from conftest import require_fuse
from layerkit import DIR

pytestmark = [pytest.mark.mount, pytest.mark.slow]

NPROC = 4
NLOWER = 8

WORKER = r'''
import errno, json, os, random, sys
mnt, wid, iters, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
sh = os.path.join(mnt, "shared")
LEGIT = {
    "rename": {errno.ENOENT},
    "unlink": {errno.ENOENT},
    "stat": {errno.ENOENT},
    "mkdir": {errno.EEXIST},
    "rmdir": {errno.ENOENT, errno.ENOTEMPTY},
    "mkfile": {errno.ENOENT},            # its directory was removed meanwhile
    "rmfile": {errno.ENOENT},
    "read": {errno.ENOENT},
}
out = {"appends": [], "bad": [], "ops": {}, "legit": {}}
def count(k, d):
    d[k] = d.get(k, 0) + 1
def do(kind, fn, *a):
    """(True, result) on success, (False, None) on an error (recorded)."""
    try:
        r = fn(*a)
        count(kind, out["ops"])
        return True, r
    except OSError as e:
        if e.errno in LEGIT.get(kind, ()):
            count(kind + ":" + errno.errorcode[e.errno], out["legit"])
        else:
            out["bad"].append([kind, [str(x) for x in a], errno.errorcode.get(e.errno, e.errno)])
        return False, None
for i in range(iters):
    # own file, then rename over a shared name (replacing whatever is there)
    name = f"w{wid}_{i}"
    payload = (name + "|").encode() * (1 + i % 40)
    fd = os.open(os.path.join(sh, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, payload)
    os.close(fd)
    if not do("rename", os.rename, os.path.join(sh, name), os.path.join(sh, f"common{rng.randrange(5)}"))[0]:
        os.unlink(os.path.join(sh, name))
    # append to a lower file (concurrent copy-up of the same file by several processes)
    j = rng.randrange(8)
    line = f"w{wid}:{i}\n".encode()
    fd = os.open(os.path.join(sh, f"L{j}"), os.O_WRONLY | os.O_APPEND)
    os.write(fd, line)
    os.close(fd)
    out["appends"].append([j, line.decode()])
    # racing unlink / stat / read of shared names
    c = os.path.join(sh, f"common{rng.randrange(5)}")
    if rng.random() < 0.3:
        do("unlink", os.unlink, c)
    else:
        ok, data = do("read", lambda p: open(p, "rb").read(), c)
        if ok and data:
            parts = data.split(b"|")
            if parts[-1] != b"" or len(set(parts[:-1])) != 1:
                out["bad"].append(["torn", [c], data[:100].decode(errors="replace")])
    do("stat", os.lstat, os.path.join(sh, f"common{rng.randrange(5)}"))
    # racing mkdir / file in it / rmdir
    d = os.path.join(sh, f"dir{rng.randrange(3)}")
    do("mkdir", os.mkdir, d)
    f = os.path.join(d, f"x{wid}")
    if do("mkfile", lambda p: open(p, "wb").close(), f)[0]:
        do("rmfile", os.unlink, f)
    do("rmdir", os.rmdir, d)
    # lower entries are never touched by anyone: they must always be listed, once
    names = os.listdir(sh)
    if len(names) != len(set(names)):
        out["bad"].append(["readdir-duplicates", [sh], sorted(names)])
    missing = [f"L{k}" for k in range(8) if f"L{k}" not in names] + \
              [f"keep{k}" for k in range(4) if f"keep{k}" not in names]
    if missing:
        out["bad"].append(["readdir-missing", [sh], missing])
print(json.dumps(out))
'''


def lower_spec():
    spec = {f"shared/L{j}": f"lower L{j}\n" * (1 + j * 1000) for j in range(NLOWER)}
    spec.update({f"shared/keep{k}": f"keep {k}\n" for k in range(4)})
    spec["shared/common0"] = "w9_9|"          # a lower file under a shared name
    spec["other/"] = DIR
    return spec


def run_workers(mnt, iters, timeout):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(mnt), str(w), str(iters),
                               str(1000 + w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for w in range(NPROC)]
    deadline = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            for q in procs:
                q.wait()
            raise AssertionError(f"workers did not finish within {timeout}s (deadlock?)")
        assert p.returncode == 0, f"worker failed ({p.returncode}):\n{err.decode()}"
        results.append(json.loads(out))
    return results


def test_concurrent_write_rename_delete(tmp_path):
    require_fuse()
    spec = lower_spec()
    s = wk.Stack(tmp_path, [spec], "s")
    with wk.watchdog(tmp_path, 300, "concurrency test"):
        with contextlib.ExitStack() as ex:
            s.mount_tested(ex)
            m = s.mnt
            results = run_workers(m, iters=150, timeout=240)
            bad = [b for r in results for b in r["bad"]]
            assert not bad, "unexpected errors / inconsistencies:\n" + "\n".join(map(str, bad))
            # every append landed exactly once, after the lower content
            for j in range(NLOWER):
                data = wk.read_file(m / f"shared/L{j}").decode()
                lower = spec[f"shared/L{j}"]
                assert data.startswith(lower), f"L{j}: lower content damaged"
                got = collections.Counter(data[len(lower):].splitlines(keepends=True))
                want = collections.Counter(line for r in results for jj, line in r["appends"]
                                           if jj == j)
                assert got == want, (f"L{j}: appended lines differ: missing "
                                     f"{list((want - got).elements())[:5]}, extra "
                                     f"{list((got - want).elements())[:5]}")
            # shared names hold complete payloads; the listing matches lookups
            names = os.listdir(m / "shared")
            assert len(names) == len(set(names))
            for n in names:
                assert os.path.lexists(m / "shared" / n), f"listed but missing: {n}"
                assert not n.startswith("w"), f"leftover temp file {n}"
                if n.startswith("common"):
                    data = wk.read_file(m / "shared" / n)
                    parts = data.split(b"|")
                    assert parts[-1] == b"" and len(set(parts[:-1])) == 1, \
                        f"{n}: torn content {data[:80]!r}"
            for k in range(5):
                if f"common{k}" not in names:
                    assert not os.path.lexists(m / f"shared/common{k}")
            # the daemon still answers
            os.stat(m)
            wk.write_file(m / "other/after", b"ok")
            assert wk.read_file(m / "other/after") == b"ok"
            seen = wk.merged_snapshot(m)
        # the upper it left: same through a remount and through the kernel overlay
        with contextlib.ExitStack() as ex:
            s.reset_work()
            s.mount_tested(ex)
            d = wk.diff_snapshots(seen, wk.merged_snapshot(s.mnt), "before", "remount")
            assert not d, "remount differs:\n  " + "\n  ".join(d)
        if layerkit.kernel_overlay_available():
            with contextlib.ExitStack() as ex:
                s.reset_work()
                s.mount_kernel(ex)
                d = wk.diff_snapshots(seen, wk.merged_snapshot(s.mnt), "ours", "kernel")
                assert not d, "kernel overlay on our upper differs:\n  " + "\n  ".join(d)


COPYUP_WORKER = r'''
import os, sys
path, wid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR)
for i in range(n):
    os.pwrite(fd, bytes([65 + wid]) * 4096, (wid * n + i) * 4096)
os.fsync(fd)
os.close(fd)
'''


def test_concurrent_copy_up_of_one_big_file(tmp_path):
    """Several processes open the same lower file for writing at once (racing copy-ups)
    and write disjoint blocks: all writes must end up in the one upper copy."""
    require_fuse()
    n = 64
    size = NPROC * n * 4096 + 12345
    base = bytes(range(256)) * (size // 256) + bytes(size % 256)
    s = wk.Stack(tmp_path, [{"big": base}], "s")
    with wk.watchdog(tmp_path, 180, "concurrent copy-up"):
        with contextlib.ExitStack() as ex:
            s.mount_tested(ex)
            procs = [subprocess.Popen([sys.executable, "-c", COPYUP_WORKER, str(s.mnt / "big"),
                                       str(w), str(n)], stderr=subprocess.PIPE)
                     for w in range(NPROC)]
            for p in procs:
                _, err = p.communicate(timeout=120)
                assert p.returncode == 0, err.decode()
            want = bytearray(base)
            for w in range(NPROC):
                for i in range(n):
                    off = (w * n + i) * 4096
                    want[off:off + 4096] = bytes([65 + w]) * 4096
            got = wk.read_file(s.mnt / "big")
            assert len(got) == len(want)
            bad = [i for i in range(0, len(want), 4096) if got[i:i + 4096] != want[i:i + 4096]]
            assert not bad, f"{len(bad)} blocks lost, first at offset {bad[0]}"
        assert wk.read_file(s.upper / "big") == bytes(want)


LISTER = r'''
import os, sys, time
d, secs = sys.argv[1], float(sys.argv[2])
stable = {f"s{k}" for k in range(50)}
end = time.monotonic() + secs
n = 0
while time.monotonic() < end:
    names = os.listdir(d)
    if len(names) != len(set(names)):
        print("duplicates", sorted(names)); sys.exit(1)
    if not stable <= set(names):
        print("missing", sorted(stable - set(names))); sys.exit(1)
    n += 1
print(n)
'''

CHURNER = r'''
import os, sys, time
d, wid, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end = time.monotonic() + secs
i = 0
while time.monotonic() < end:
    p = os.path.join(d, f"t{wid}_{i % 40}")
    if i % 80 < 40:
        open(p, "wb").close()
    else:
        os.unlink(p)
    i += 1
'''


def test_readdir_stable_while_directory_changes(tmp_path):
    """Listing a big merged directory while others create and delete entries in it: no
    duplicates, and the entries nobody touches are always listed."""
    require_fuse()
    spec = {f"d/s{k}": f"{k}" for k in range(0, 50, 2)}
    s = wk.Stack(tmp_path, [spec, {f"d/s{k}": f"{k}" for k in range(1, 50, 2)}], "s")
    with wk.watchdog(tmp_path, 120, "readdir under churn"):
        with contextlib.ExitStack() as ex:
            s.mount_tested(ex)
            d = str(s.mnt / "d")
            churn = [subprocess.Popen([sys.executable, "-c", CHURNER, d, str(w), "4"])
                     for w in range(2)]
            listers = [subprocess.Popen([sys.executable, "-c", LISTER, d, "4"],
                                        stdout=subprocess.PIPE) for _ in range(2)]
            for p in listers:
                out, _ = p.communicate(timeout=60)
                assert p.returncode == 0, f"lister: {out.decode()}"
                assert int(out) > 0
            for p in churn:
                p.wait(timeout=60)
                assert p.returncode == 0
            names = os.listdir(d)
            assert len(names) == len(set(names))
            assert {f"s{k}" for k in range(50)} <= set(names)
