#!/usr/bin/env python3
"""Performance yardstick for overlayfs-py.

Runs the same workloads on four targets and prints the median of each cell and how many
times slower it is than a plain directory:

  plain           a plain directory (the layer itself, or a copy of it when the workload writes)
  kernel          the kernel overlay driver (mount -t overlay)
  fuse-overlayfs  the C FUSE implementation (Debian package)
  overlayfs-py    this project (python -m overlayfs_py -f -o ...)

Fixtures are built once, deterministically, under benchmarks/cache/ (or --cache DIR) and reused.
See benchmarks/README.md for the workloads and how to read the table.

Run as root: it mounts, drops the page cache, and (optionally) sets up an xfs loop device.
Every mount it makes is undone in a finally block (lazy unmount as a fallback), and it only
ever signals the daemons it started, by pid.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

FIXTURE_VERSION = 3
FIXED_MTIME = 1577836800          # 2020-01-01T00:00:00Z, every fixture file and directory
MiB = 1 << 20
GiB = 1 << 30


# --------------------------------------------------------------------------------------------
# sizes

@dataclass(frozen=True)
class Sizes:
    mode: str
    tree_files: int        # files in the image tree (plus the package tree and the big file)
    tree_dirs: int
    big_bytes: int         # the big lower file (real data, not sparse)
    git_files: int
    depths: tuple          # stack depths for the stat workload
    stat_paths: int        # bottom-layer files stat()ed
    layer_files: int       # files in each non-bottom stack layer
    mount_depth: int       # stack depth for the mount-time workload
    delete_n: int          # lower files deleted (whiteouts)
    create_n: int          # small files created then deleted
    write_bytes: int       # new file written sequentially


FULL = Sizes("full", 50_000, 2_000, GiB, 10_000, (1, 8, 32, 128, 500), 10_000, 315, 128,
             10_000, 10_000, GiB)
QUICK = Sizes("quick", 5_000, 200, 64 * MiB, 1_000, (1, 8, 32), 1_000, 130, 32,
              1_000, 1_000, 64 * MiB)


def human_bytes(n: int) -> str:
    if n >= GiB and n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= MiB:
        return f"{n // MiB} MiB"
    return f"{n} B"


def kfmt(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


OWN_DROPS = [0]


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    OWN_DROPS[0] += 1


def vmstat_drops() -> int:
    """drop_pagecache + drop_slab from /proc/vmstat: bumped by every write to drop_caches."""
    n = 0
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith(("drop_pagecache ", "drop_slab ")):
                n += int(line.split()[1])
    return n


class DropWatch:
    """Counts drop_caches writes by other processes since creation. Test suites on the same
    machine do that; a drop in the middle of a warm measurement turns it into a cold one
    (seen: fuse-overlayfs "warm" stat at 500 layers, 205 s instead of 0.07 s)."""

    def __init__(self):
        self.v0, self.o0 = vmstat_drops(), OWN_DROPS[0]

    def foreign(self) -> int:
        return (vmstat_drops() - self.v0) - 2 * (OWN_DROPS[0] - self.o0)


DROP_RETRIES = 2


def set_tree_mtimes(root: str) -> None:
    """Fixed mtimes everywhere, so fixtures are identical across builds (and git is not racy)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME),
                     follow_symlinks=False)
    os.utime(root, (FIXED_MTIME, FIXED_MTIME))


def count_entries(root: str) -> int:
    n = 1
    for _dirpath, dirnames, filenames in os.walk(root):
        n += len(dirnames) + len(filenames)
    return n


# --------------------------------------------------------------------------------------------
# fixtures

class Fixtures:
    """Deterministic fixture trees under CACHE/MODE/. Each part is built once, into a temporary
    directory renamed into place, and tagged with a stamp that records the sizes it was built
    for; a stamp mismatch (other sizes, other FIXTURE_VERSION) rebuilds that part."""

    def __init__(self, cache: str, sizes: Sizes, rebuild: bool = False):
        self.sizes = sizes
        self.root = os.path.join(cache, sizes.mode)
        self.rebuild = rebuild
        os.makedirs(self.root, exist_ok=True)
        self.image = os.path.join(self.root, "image")      # tree/, pkg/, big.bin
        self.gitrepo = os.path.join(self.root, "gitrepo")
        self.stack = os.path.join(self.root, "stack")      # 0 (bottom) .. N-1
        self.meta: dict = {}

    # -- helpers
    def _stamp(self, part: str, extra: dict) -> dict:
        return {"version": FIXTURE_VERSION, "part": part, "sizes": asdict(self.sizes), **extra}

    def _ready(self, path: str, stamp: dict) -> Optional[dict]:
        if self.rebuild:
            return None
        try:
            with open(path + ".stamp") as f:
                got = json.load(f)
        except (OSError, ValueError):
            return None
        want = json.loads(json.dumps(stamp))      # tuples -> lists, as stored
        if {k: got.get(k) for k in want} != want:
            return None
        return got

    def _build(self, path: str, stamp: dict, builder: Callable[[str], dict]) -> dict:
        got = self._ready(path, stamp)
        if got is not None:
            return got
        log(f"building fixture {os.path.relpath(path, self.root)} ({self.sizes.mode}) ...")
        t0 = time.monotonic()
        tmp = path + ".tmp"
        for p in (tmp, path):
            if os.path.lexists(p):
                shutil.rmtree(p)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + ".stamp")
        os.makedirs(tmp)
        info = builder(tmp)
        os.sync()
        os.rename(tmp, path)
        info = {**stamp, **info, "build_seconds": round(time.monotonic() - t0, 1)}
        with open(path + ".stamp", "w") as f:
            json.dump(info, f, indent=1)
        log(f"  built in {info['build_seconds']} s")
        return info

    def build(self) -> None:
        self.meta["image"] = self._build(self.image, self._stamp("image", {}), self._build_image)
        self.meta["gitrepo"] = self._build(self.gitrepo, self._stamp("gitrepo", {}),
                                           self._build_gitrepo)
        self.meta["stack"] = self._build(self.stack, self._stamp("stack", {}), self._build_stack)

    # -- the image layer: a tree shaped like a distro image, a package tree, a big file
    PKG_DIRS = ("email", "json", "http", "xml", "asyncio", "unittest")

    def _build_image(self, root: str) -> dict:
        s = self.sizes
        rng = random.Random(20240501)
        pool = rng.randbytes(8 * MiB)
        tree = os.path.join(root, "tree")
        os.mkdir(tree)
        dirs = ["tree"]
        for i in range(1, s.tree_dirs):
            # bias the parent towards early (shallow) directories: a few wide levels, long tail
            parent = dirs[int(len(dirs) * rng.random() ** 2)]
            d = f"{parent}/d{i:04d}"
            os.mkdir(os.path.join(root, d))
            dirs.append(d)
        exts = (".so", ".py", ".h", ".txt", "", ".gz", ".conf", ".mo", ".json", ".png")
        regular: List[str] = []
        per_dir: Dict[str, List[str]] = {}
        nbytes = 0
        for j in range(s.tree_files):
            d = dirs[int(len(dirs) * rng.random() ** 1.5)]    # skewed: some dirs hold many files
            name = f"f{j:05d}{rng.choice(exts)}"
            rel = f"{d}/{name}"
            path = os.path.join(root, rel)
            siblings = per_dir.setdefault(d, [])
            if siblings and rng.random() < 0.03:
                os.symlink(rng.choice(siblings), path)            # relative, to a sibling
                continue
            size = int(min(rng.lognormvariate(7.2, 1.6), 2 * MiB))   # median ~1.3 KiB
            off = rng.randrange(0, len(pool) - size)
            with open(path, "wb") as f:
                f.write(pool[off:off + size])
            if rng.random() < 0.1:
                os.chmod(path, 0o755)
            nbytes += size
            regular.append(rel)
            siblings.append(name)
        # the package tree for compileall: a copy of a few stdlib packages, without caches
        stdlib = sysconfig.get_paths()["stdlib"]
        pkg = os.path.join(root, "pkg")
        os.mkdir(pkg)
        for name in self.PKG_DIRS:
            shutil.copytree(os.path.join(stdlib, name), os.path.join(pkg, name),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        pkg_py = sum(1 for _d, _s, fs in os.walk(pkg) for f in fs if f.endswith(".py"))
        # the big file: real data, 1 MiB blocks cut from the random pool, each block numbered
        with open(os.path.join(root, "big.bin"), "wb") as f:
            for i in range(s.big_bytes // MiB):
                off = (i * 2654435761) % (len(pool) - MiB)
                f.write(i.to_bytes(8, "little") + pool[off + 8:off + MiB])
        set_tree_mtimes(root)
        step = max(1, len(regular) // s.delete_n)
        delete = regular[::step][:s.delete_n]
        with open(os.path.join(root, "..", "image.delete-list"), "w") as f:
            f.write("\n".join(delete) + "\n")
        return {"entries": count_entries(root), "tree_regular_files": len(regular),
                "pkg_from": stdlib,
                "tree_dirs": len(dirs), "tree_bytes": nbytes, "pkg_py_files": pkg_py,
                "big_bytes": s.big_bytes}

    def delete_list(self) -> List[str]:
        with open(os.path.join(self.root, "image.delete-list")) as f:
            return f.read().split()

    # -- a git repository with git_files files
    def _build_gitrepo(self, root: str) -> dict:
        s = self.sizes
        rng = random.Random(20240502)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10)))
                 for _ in range(2000)]
        lines = []
        total = 0
        while total < 4 * MiB:
            indent = "    " * rng.randint(0, 3)
            line = indent + " ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) + "\n"
            lines.append(line)
            total += len(line)
        text = "".join(lines)
        ndirs = max(1, s.git_files // 20)
        dirs = ["src"]
        os.mkdir(os.path.join(root, "src"))
        for i in range(1, ndirs):
            parent = dirs[int(len(dirs) * rng.random() ** 2)]
            d = f"{parent}/m{i:03d}"
            os.mkdir(os.path.join(root, d))
            dirs.append(d)
        for j in range(s.git_files):
            d = rng.choice(dirs)
            size = int(min(rng.lognormvariate(7.6, 1.0), 256 * 1024))
            off = rng.randrange(0, len(text) - size)
            off = text.find("\n", off) + 1
            with open(os.path.join(root, d, f"file{j:05d}.c"), "w") as f:
                f.write(text[off:off + size])
        set_tree_mtimes(root)
        env = git_env(self.root)
        run = lambda *a: subprocess.run(["git", *a], cwd=root, env=env, check=True,  # noqa: E731
                                        stdout=subprocess.DEVNULL)
        run("init", "-q")
        run("add", "-A")
        run("-c", "user.name=bench", "-c", "user.email=bench@example.invalid",
            "commit", "-q", "-m", "fixture")
        return {"files": s.git_files, "dirs": ndirs}

    # -- the layer stack: 0 is the bottom (holds the stat()ed paths), 1.. are small layers
    def _build_stack(self, root: str) -> dict:
        s = self.sizes
        rng = random.Random(20240503)
        nd = max(1, s.stat_paths // 100)
        bottom = os.path.join(root, "0")
        for k in range(nd):
            d = os.path.join(bottom, "usr", "lib", f"d{k:02d}")
            os.makedirs(d)
            for m in range(100):
                with open(os.path.join(d, f"f{m:03d}"), "wb") as f:
                    f.write(b"x" * rng.randrange(0, 200))
        os.makedirs(os.path.join(bottom, "etc"))
        nlayers = max(max(s.depths), s.mount_depth)
        for i in range(1, nlayers):
            layer = os.path.join(root, str(i))
            # each small layer adds files to a few of the bottom's directories (so lookups
            # of bottom paths have to look through it) and a directory of its own
            shared = rng.sample(range(nd), min(10, nd))
            own = os.path.join(layer, "usr", "share", f"l{i}")
            os.makedirs(own)
            os.makedirs(os.path.join(layer, "etc"))
            for k in shared:
                os.makedirs(os.path.join(layer, "usr", "lib", f"d{k:02d}"))
            for n in range(s.layer_files):
                if n % 3 == 2:
                    path = os.path.join(own, f"g{n:03d}")
                elif n % 3 == 1 and n < 30:
                    path = os.path.join(layer, "etc", f"l{i}_{n}")
                else:
                    path = os.path.join(layer, "usr", "lib", f"d{rng.choice(shared):02d}",
                                        f"l{i}_{n:03d}")
                with open(path, "wb") as f:
                    f.write(b"y" * rng.randrange(0, 200))
        set_tree_mtimes(root)
        for i in range(nlayers):
            set_tree_mtimes(os.path.join(root, str(i)))
        mount_files = s.stat_paths + (s.mount_depth - 1) * s.layer_files
        return {"layers": nlayers, "mount_stack_files": mount_files}

    def prime(self) -> float:
        """Read every fixture file once. On a VM the host caches the virtual disk too; without
        this, whichever target happens to run first in a "cold" cell reads from the real disk
        and looks several times slower (seen: tar cold 35 s vs 6 s). "Cold" in this bench
        means the guest's caches are dropped."""
        t0 = time.monotonic()
        buf = bytearray(MiB)
        for top in (self.image, self.gitrepo, self.stack):
            for dirpath, _dirs, files in os.walk(top):
                for name in files:
                    p = os.path.join(dirpath, name)
                    if os.path.islink(p):
                        continue
                    with open(p, "rb", buffering=0) as f:
                        while f.readinto(buf):
                            pass
        return time.monotonic() - t0

    def stat_paths(self) -> List[str]:
        nd = max(1, self.sizes.stat_paths // 100)
        return [f"usr/lib/d{k:02d}/f{m:03d}" for k in range(nd) for m in range(100)]

    def stack_lowers(self, depth: int) -> List[str]:
        """Top first, like lowerdir=."""
        return [os.path.join(self.stack, str(i)) for i in reversed(range(depth))]


def git_env(cache_root: str) -> dict:
    home = os.path.join(cache_root, "home")
    os.makedirs(home, exist_ok=True)
    env = dict(os.environ)
    env.update({"HOME": home, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_DATE": "2020-01-01T00:00:00Z",
                "GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z", "LC_ALL": "C"})
    env.pop("GIT_INDEX_FILE", None)
    env.pop("GIT_DIR", None)
    return env


# --------------------------------------------------------------------------------------------
# targets and mounts

class MountError(Exception):
    pass


class NotApplicable(Exception):
    pass


@dataclass
class Target:
    name: str
    kind: str                    # plain | kernel | fuse
    cmd: Optional[List[str]] = None
    env: Optional[dict] = None
    disabled: Optional[str] = None
    mounted_ok: int = 0
    mount_failures: int = 0


ACTIVE: set = set()               # live mounts, for the atexit safety net


class Mounted:
    def __init__(self, target: Target, mnt: str, proc: Optional[subprocess.Popen] = None,
                 logpath: Optional[str] = None):
        self.target = target
        self.mnt = mnt
        self.proc = proc
        self.logpath = logpath
        self.exit_status: Optional[int] = None
        self.done = False
        ACTIVE.add(self)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def log_tail(self, n: int = 400) -> str:
        if not self.logpath:
            return ""
        try:
            with open(self.logpath, "rb") as f:
                data = f.read()
        except OSError:
            return ""
        return data[-n:].decode(errors="replace").strip()

    def unmount(self) -> None:
        if self.done:
            return
        self.done = True
        try:
            if self.proc is not None:
                r = subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True)
                if r.returncode != 0 and self.proc.poll() is None:
                    subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
                try:
                    self.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
                    self.proc.terminate()          # only our own daemon, by pid
                    try:
                        self.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
                self.exit_status = self.proc.returncode
                if mount_listed(self.mnt):         # daemon gone but mount left behind
                    subprocess.run(["fusermount3", "-u", "-z", self.mnt], capture_output=True)
            else:
                r = subprocess.run(["umount", self.mnt], capture_output=True)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        finally:
            ACTIVE.discard(self)


def cleanup_active() -> None:
    for m in list(ACTIVE):
        with contextlib.suppress(Exception):
            m.unmount()


def mount(target: Target, lowers: List[str], upper: str, work: str, mnt: str,
          timeout: float = 180.0, options: tuple = ()) -> Mounted:
    """options: extra mount options appended to lowerdir=,upperdir=,workdir= (metacopy=on)."""
    extra = "".join("," + o for o in options)
    if target.kind == "fuse":
        opts = f"lowerdir={':'.join(lowers)},upperdir={upper},workdir={work}{extra}"
        logpath = os.path.join(os.path.dirname(mnt), "daemon.log")
        with open(logpath, "wb") as logf:
            proc = subprocess.Popen([*target.cmd, "-f", "-o", opts, mnt], stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT, env=target.env,
                                    start_new_session=True)
        h = Mounted(target, mnt, proc, logpath)
        deadline = time.monotonic() + timeout
        try:
            # poll /proc/self/mountinfo, not os.path.ismount(): a stat of a FUSE mount whose
            # daemon never answers INIT blocks uninterruptibly, and the bench would hang
            while not mount_listed(mnt):
                rc = proc.poll()
                if rc is not None:
                    raise MountError(f"daemon exited with status {rc} before the mount was live: "
                                     f"{h.log_tail() or '(no output)'}")
                if time.monotonic() > deadline:
                    raise MountError(f"not mounted after {timeout:.0f} s: {h.log_tail()}")
                time.sleep(0.002)
            # then the first request, from a helper thread: if the daemon never answers, kill
            # it (our own pid), which aborts the connection and frees the waiting thread
            ok, err = stat_with_timeout(mnt, max(1.0, deadline - time.monotonic()))
            if not ok:
                stack = kernel_stack(proc.pid)
                proc.kill()
                raise MountError(f"mounted, but the daemon did not answer a stat of the mount "
                                 f"point within {timeout:.0f} s (daemon killed; its kernel "
                                 f"stack: {stack}); log: {h.log_tail() or '(no output)'}")
            if err:
                raise MountError(f"stat of the fresh mount failed: {err}; log: {h.log_tail()}")
        except BaseException:
            h.unmount()
            raise
        return h
    if target.kind == "kernel":
        # the option string must fit in a page: use names relative to the layers' common
        # parent (mount(2) resolves them against our cwd, as Docker does)
        parents = {os.path.dirname(p) for p in lowers}
        cwd = None
        names = lowers
        if len(parents) == 1:
            cwd = parents.pop()
            names = [os.path.basename(p) for p in lowers]
        opts = f"lowerdir={':'.join(names)},upperdir={upper},workdir={work}{extra}"
        if len(opts) >= 4096:
            raise MountError(f"overlay option string is {len(opts)} bytes, more than a page")
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, mnt], cwd=cwd,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise MountError(f"mount -t overlay failed ({len(lowers)} lowers, options "
                             f"{len(opts)} bytes): {r.stderr.strip()}")
        return Mounted(target, mnt)
    raise NotApplicable("plain directory: nothing to mount")


def mount_listed(mnt: str) -> Optional[str]:
    """The mount's major:minor if mnt is a mount point (read from mountinfo, without a stat)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4].encode().decode("unicode_escape") == mnt:
                return parts[2]
    return None


def stat_with_timeout(path: str, timeout: float):
    done = threading.Event()
    err: List[str] = []

    def probe():
        try:
            os.stat(path)
        except OSError as e:
            err.append(str(e))
        finally:
            done.set()
    threading.Thread(target=probe, daemon=True).start()
    return done.wait(timeout), (err[0] if err else None)


def kernel_stack(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stack") as f:
            frames = [ln.split("]", 1)[-1].strip().split("+")[0] for ln in f]
        return " < ".join(frames[:4])
    except OSError:
        return "?"


@dataclass
class View:
    path: str                     # where the workload operates
    pid: Optional[int] = None     # daemon pid (FUSE targets)
    base: str = ""                # the per-run scratch directory


def cleanup_stale(cache: str) -> None:
    """Unmount anything a previous, killed run left mounted under our cache directory."""
    cache = os.path.realpath(cache)
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    stale = []
    for line in lines:
        parts = line.split()
        mnt = parts[4].encode().decode("unicode_escape")
        fstype = parts[parts.index("-") + 1]
        if mnt == cache or mnt.startswith(cache + "/"):
            stale.append((mnt, fstype))
    for mnt, fstype in sorted(stale, key=lambda x: -len(x[0])):
        log(f"unmounting stale {fstype} mount {mnt}")
        if fstype.startswith("fuse"):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        else:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    for img in (os.path.join(cache, m, "xfs.img") for m in ("quick", "full")):
        if os.path.exists(img):
            r = subprocess.run(["losetup", "-j", img], capture_output=True, text=True)
            for line in r.stdout.splitlines():
                dev = line.split(":", 1)[0]
                log(f"detaching stale loop device {dev}")
                subprocess.run(["losetup", "-d", dev], capture_output=True)


# --------------------------------------------------------------------------------------------
# the xfs loop image for the reflink workload

class XfsImage:
    def __init__(self, fx: Fixtures):
        self.fx = fx
        self.img = os.path.join(fx.root, "xfs.img")
        self.mnt = os.path.join(fx.root, "xfs")
        self.loop: Optional[str] = None
        self.mounted = False

    def setup(self) -> str:
        if not shutil.which("mkfs.xfs"):
            raise NotApplicable("mkfs.xfs not installed (apt-get install xfsprogs)")
        size = 3 * self.fx.sizes.big_bytes + 512 * MiB
        if not os.path.exists(self.img + ".ok"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.img)
            with open(self.img, "wb") as f:
                f.truncate(size)
            subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", self.img], check=True)
            open(self.img + ".ok", "w").close()
        os.makedirs(self.mnt, exist_ok=True)
        self.loop = subprocess.run(["losetup", "--find", "--show", self.img], check=True,
                                   capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", "-t", "xfs", self.loop, self.mnt], check=True)
        self.mounted = True
        lower = os.path.join(self.mnt, "lower")
        big = os.path.join(lower, "big.bin")
        if not os.path.exists(os.path.join(self.mnt, "lower.ok")):
            shutil.rmtree(lower, ignore_errors=True)
            os.makedirs(lower)
            shutil.copyfile(os.path.join(self.fx.image, "big.bin"), big)
            os.utime(big, (FIXED_MTIME, FIXED_MTIME))
            os.sync()
            open(os.path.join(self.mnt, "lower.ok"), "w").close()
        runs = os.path.join(self.mnt, "run")
        shutil.rmtree(runs, ignore_errors=True)
        os.makedirs(runs)
        return lower

    def teardown(self) -> None:
        if self.mounted:
            r = subprocess.run(["umount", self.mnt], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", self.mnt], capture_output=True)
            self.mounted = False
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None


# --------------------------------------------------------------------------------------------
# metrics

@dataclass(frozen=True)
class Metric:
    name: str
    unit: str                  # s | MB/s | files/s | MiB
    higher_better: bool = False
    depth: Optional[int] = None   # stat rows: also compare with the same target's 1-layer time
    cold: Optional[bool] = None


def fmt_value(v: float, unit: str) -> str:
    if unit == "s":
        if v < 0.001:
            return f"{v * 1e6:.0f} µs"
        if v < 1:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"
    if unit == "MB/s":
        return f"{v:.0f} MB/s" if v >= 100 else f"{v:.3g} MB/s"
    if unit == "files/s":
        return f"{v / 1000:.3g}k/s" if v >= 1000 else f"{v:.3g}/s"
    if unit == "MiB":
        return f"{v:.3g} MiB"
    return f"{v:.3g} {unit}"


def slowdown(v: float, ref: float, higher_better: bool) -> Optional[float]:
    """How many times worse than ref (1.0 = the same, 2.0 = twice as slow / half the rate)."""
    try:
        return ref / v if higher_better else v / ref
    except ZeroDivisionError:
        return None


def fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return "?"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    return f"{r:.2f}×"


# --------------------------------------------------------------------------------------------
# the bench

TARGET_ORDER = ("plain", "kernel", "fuse-overlayfs", "overlayfs-py")

# the metacopy workload: the first metadata change of a big lower file, one fresh mount each
METACOPY_OPS = ("chmod", "chown", "utimes", "setxattr")
METACOPY_TARGETS = ("kernel", "overlayfs-py")   # mounted with metacopy=on, and checked
METACOPY_XATTR = "trusted.overlay.metacopy"
METACOPY_MAX_ALLOC = 64 * 1024    # allocated bytes still counted as "no data" (an xattr block)
METACOPY_UID = 1000
METACOPY_TIME = FIXED_MTIME + 86400


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        self.cache = os.path.abspath(args.cache)
        self.fx = Fixtures(self.cache, self.sizes, rebuild=args.rebuild)
        self.run_root = os.path.join(self.cache, "run")
        self.targets = self._make_targets()
        self.metrics: Dict[str, Metric] = {}
        self.values: Dict[str, Dict[str, List[float]]] = {}
        self.by_rep: Dict[str, Dict[str, Dict[int, float]]] = {}
        self.errors: Dict[str, Dict[str, List[str]]] = {}
        self.na: Dict[str, Dict[str, str]] = {}
        self.checks: Dict[str, Dict[str, set]] = {}
        self.notes: List[str] = []
        self.xfs: Optional[XfsImage] = None
        self.xfs_lower: Optional[str] = None
        self.xfs_error: Optional[str] = None
        self._seq = 0
        self.timed_out: Optional[str] = None
        self.tainted: set = set()       # (metric, target): a foreign cache drop hit a value

    # -- targets
    def _make_targets(self) -> List[Target]:
        ours_cmd = self.args.ours_cmd or os.environ.get("OVL_BENCH_OURS")
        if ours_cmd:
            cmd = shlex.split(ours_cmd)
        else:
            venv_py = os.path.join(REPO, ".venv", "bin", "python")
            py = venv_py if os.path.exists(venv_py) else sys.executable
            cmd = [py, "-m", "overlayfs_py"]
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        all_targets = {
            "plain": Target("plain", "plain"),
            "kernel": Target("kernel", "kernel"),
            "fuse-overlayfs": Target("fuse-overlayfs", "fuse", ["fuse-overlayfs"]),
            "overlayfs-py": Target("overlayfs-py", "fuse", cmd, env),
        }
        if not shutil.which("fuse-overlayfs"):
            all_targets["fuse-overlayfs"].disabled = "fuse-overlayfs not installed"
        wanted = self.args.targets.split(",") if self.args.targets else list(TARGET_ORDER)
        unknown = [t for t in wanted if t not in all_targets]
        if unknown:
            raise SystemExit(f"unknown target(s) {unknown}; choose from {list(TARGET_ORDER)}")
        return [all_targets[t] for t in TARGET_ORDER if t in wanted]

    # -- scratch space and views
    def _scratch(self, base: Optional[str] = None) -> str:
        self._seq += 1
        d = os.path.join(base or self.run_root, f"r{self._seq}")
        os.makedirs(d)
        return d

    def _remove(self, d: str) -> None:
        for sub in ("m",):
            p = os.path.join(d, sub)
            if mount_listed(p):
                self.notes.append(f"{p} still mounted; not removing its run directory")
                return
        shutil.rmtree(d, ignore_errors=True)

    def _mount(self, t: Target, lowers: List[str], upper: str, work: str, mnt: str,
               options: tuple = ()) -> Mounted:
        try:
            h = mount(t, lowers, upper, work, mnt, options=options)
        except MountError as e:
            t.mount_failures += 1
            if t.mounted_ok == 0 and t.mount_failures >= 2:
                t.disabled = f"never mounted: {e}"
            raise
        t.mounted_ok += 1
        return h

    def _finish(self, t: Target, h: Mounted) -> None:
        h.unmount()
        if h.exit_status not in (None, 0):
            self.notes.append(f"{t.name}: daemon exited with status {h.exit_status} after "
                              f"unmount: {h.log_tail(200)}")

    @contextlib.contextmanager
    def view(self, t: Target, lowers: List[str], plain_copy: Optional[Callable[[str], None]] = None,
             base: Optional[str] = None, options: tuple = ()):
        """A fresh overlay mount of lowers (top first) with a fresh upper and work dir, or for
        the plain target the bottom layer itself (read-only workloads) or a fresh copy made by
        plain_copy(dir) outside the timed part (workloads that write). options: extra mount
        options for the overlay targets. The upper dir is View.base/u."""
        d = self._scratch(base)
        try:
            if t.kind == "plain":
                if plain_copy is None:
                    yield View(lowers[-1], None, d)
                else:
                    p = os.path.join(d, "plain")
                    os.mkdir(p)
                    plain_copy(p)
                    os.sync()        # the copy's dirty data must not land in the timed part
                    yield View(p, None, d)
                return
            u, w, m = (os.path.join(d, x) for x in ("u", "w", "m"))
            for x in (u, w, m):
                os.mkdir(x)
            h = self._mount(t, lowers, u, w, m, options)
            try:
                os.sync()
                yield View(m, h.pid, d)
            finally:
                self._finish(t, h)
        finally:
            self._remove(d)

    # -- recording
    @staticmethod
    def metric(name: str, unit: str, higher_better: bool = False, **kw) -> Metric:
        return Metric(name, unit, higher_better, **kw)

    def record(self, metric: str, target: str, value: float, rep: int) -> None:
        self.values.setdefault(metric, {}).setdefault(target, []).append(value)
        self.by_rep.setdefault(metric, {}).setdefault(target, {})[rep] = value

    def paired(self, metric: str, target: str, ref_metric: str, ref_target: str,
               higher_better: bool) -> Optional[float]:
        """Median over repetitions of the per-repetition ratio. Targets are interleaved, so the
        two values of one repetition ran close together, under the same background load."""
        a = self.by_rep.get(metric, {}).get(target, {})
        b = self.by_rep.get(ref_metric, {}).get(ref_target, {})
        ratios = [slowdown(a[r], b[r], higher_better) for r in a if r in b]
        ratios = [x for x in ratios if x is not None]
        return statistics.median(ratios) if ratios else None

    def record_error(self, metric: str, target: str, err: str) -> None:
        self.errors.setdefault(metric, {}).setdefault(target, []).append(err)

    def check(self, what: str, target: str, value) -> None:
        """Record an observable that must be equal across targets (entry counts, tar size)."""
        self.checks.setdefault(what, {}).setdefault(target, set()).add(value)

    # -- the driver
    def workloads(self):
        return [
            ("mount", self.wl_mount),
            ("stat", self.wl_stat),
            ("find", self.wl_find),
            ("du", self.wl_du),
            ("tar", self.wl_tar),
            ("rss", self.wl_rss),
            ("read", self.wl_read),
            ("write", self.wl_write),
            ("copyup", self.wl_copyup),
            ("metacopy", self.wl_metacopy),
            ("create", self.wl_create),
            ("whiteout", self.wl_whiteout),
            ("git", self.wl_git),
            ("compileall", self.wl_compileall),
            ("reflink", self.wl_reflink),
        ]

    def stat_name(self, depth: int, cold: bool) -> str:
        return (f"stat {kfmt(self.sizes.stat_paths)} bottom paths, {depth} "
                f"layer{'s' if depth > 1 else ''}, {'cold' if cold else 'warm'}")

    def declared_metrics(self, wl: str) -> List[str]:
        """The metric names a workload produces (so n/a cells can be filled in)."""
        s = self.sizes
        big = human_bytes(s.big_bytes)
        tf = kfmt(s.tree_files)
        m = {
            "mount": [self.metric(f"mount {s.mount_depth}-layer stack, first (cold)", "s"),
                      self.metric(f"mount {s.mount_depth}-layer stack, remount", "s")],
            "stat": [self.metric(self.stat_name(d, c == "cold"), "s", depth=d, cold=(c == "cold"))
                     for d in s.depths for c in ("cold", "warm")],
            "find": [self.metric(f"find, {tf}-file image, cold", "s"),
                     self.metric(f"find, {tf}-file image, warm", "s")],
            "du": [self.metric(f"du -s, {tf}-file image, cold", "s"),
                   self.metric(f"du -s, {tf}-file image, warm", "s")],
            "tar": [self.metric(f"tar -c, {tf}-file tree, cold", "s"),
                    self.metric(f"tar -c, {tf}-file tree, warm", "s")],
            "rss": [self.metric("daemon RSS after mount", "MiB"),
                    self.metric(f"daemon RSS after walking {kfmt(s.tree_files)} files", "MiB")],
            "read": [self.metric(f"seq read {big}, cold", "MB/s", True),
                     self.metric(f"seq read {big}, warm", "MB/s", True)],
            "write": [self.metric(f"seq write {human_bytes(s.write_bytes)} + fsync", "MB/s", True)],
            "copyup": [self.metric(f"copy-up: append 1 B to {big} lower file", "s"),
                       self.metric(f"copy-up: chmod {big} lower file", "s")],
            "metacopy": [self.metric(f"metacopy=on: {op} {big} lower file", "s")
                         for op in METACOPY_OPS],
            "create": [self.metric(f"create {kfmt(s.create_n)} small files", "s"),
                       self.metric(f"delete those {kfmt(s.create_n)} files", "s")],
            "whiteout": [self.metric(f"delete {kfmt(s.delete_n)} lower files (whiteouts)",
                                     "files/s", True)],
            "git": [self.metric("git status, 1st", "s"), self.metric("git status, 2nd", "s")],
            "compileall": [self.metric("python -m compileall pkg", "s")],
            "reflink": [self.metric(f"xfs reflink copy-up: append 1 B to {big}", "s")],
        }
        for metric in m[wl]:
            self.metrics.setdefault(metric.name, metric)
        return [metric.name for metric in m[wl]]

    def run(self) -> None:
        wanted = set(self.args.only.split(",")) if self.args.only else None
        skip = set(self.args.skip.split(",")) if self.args.skip else set()
        if not self.args.xfs:
            skip.add("reflink")
        reps = self.args.reps
        for wl, fn in self.workloads():
            if (wanted is not None and wl not in wanted) or wl in skip:
                continue
            names = self.declared_metrics(wl)
            for rep in range(reps):
                order = self.targets[rep % len(self.targets):] + self.targets[:rep % len(self.targets)]
                for t in order:
                    if t.disabled:
                        for n in names:
                            self.na.setdefault(n, {})[t.name] = t.disabled
                        continue
                    t0 = time.monotonic()
                    self.timed_out = None
                    timer = threading.Timer(self.args.cell_timeout, self._on_cell_timeout,
                                            args=(f"{wl} rep {rep + 1} {t.name}",))
                    timer.daemon = True
                    timer.start()
                    try:
                        for attempt in range(DROP_RETRIES + 1):
                            watch = DropWatch()
                            got = fn(t)
                            foreign = watch.foreign()
                            if foreign <= 0 or wl == "stat":    # stat checks each depth itself
                                break
                            if attempt < DROP_RETRIES:
                                log(f"{wl} rep {rep + 1}/{reps} {t.name}: another process dropped "
                                    f"the caches ({foreign}) during the cell; repeating it")
                                continue
                            for n in got:
                                self.tainted.add((n, t.name))
                    except NotApplicable as e:
                        for n in names:
                            self.na.setdefault(n, {})[t.name] = str(e)
                        continue
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as e:       # one failed cell must not stop the bench
                        err = self._cell_error(e)
                        if not isinstance(e, (MountError, subprocess.CalledProcessError)):
                            fr = traceback.extract_tb(e.__traceback__)[-1]
                            err += f" (at {os.path.basename(fr.filename)}:{fr.lineno})"
                        for n in names:
                            self.record_error(n, t.name, err)
                        log(f"{wl} rep {rep + 1}/{reps} {t.name}: FAILED {err[:300]}")
                        continue
                    finally:
                        timer.cancel()
                    for n, v in got.items():
                        self.record(n, t.name, v, rep)
                    shown = ", ".join(f"{n.split(',')[-1].strip() if ',' in n else n}="
                                      f"{fmt_value(v, self.metrics[n].unit)}" for n, v in got.items())
                    log(f"{wl} rep {rep + 1}/{reps} {t.name}: {shown}  "
                        f"[{time.monotonic() - t0:.1f} s]")

    def _on_cell_timeout(self, label: str) -> None:
        """Watchdog: a cell ran too long, most likely a hung daemon. Kill the daemons we
        started (by pid); that aborts their FUSE connections, so every blocked syscall returns
        ENOTCONN, the workload fails, and the normal cleanup unmounts."""
        self.timed_out = label
        for m in list(ACTIVE):
            if m.proc is not None and m.proc.poll() is None:
                log(f"watchdog: {label} exceeded {self.args.cell_timeout:.0f} s; "
                    f"killing {m.target.name} daemon pid {m.proc.pid} "
                    f"(kernel stack: {kernel_stack(m.proc.pid)})")
                m.proc.kill()

    # ---------------------------------------------------------------- workloads
    def _timed_cmd(self, cmd: List[str], cwd: Optional[str] = None, env=None,
                   timeout: float = 3600) -> (float, str):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} exited {r.returncode}: "
                               f"{r.stderr.decode(errors='replace').strip()[-300:]}")
        return dt, r.stdout.decode(errors="replace")

    def _cell_error(self, e: Exception) -> str:
        """How a failed cell is recorded; says so when the watchdog killed the daemon."""
        err = f"{type(e).__name__}: {e}"
        if self.timed_out:
            err = f"timed out after {self.args.cell_timeout:.0f} s, daemon killed; then {err}"
        return err

    def wl_mount(self, t: Target) -> dict:
        if t.kind == "plain":
            raise NotApplicable("plain directory: nothing to mount")
        first, again = self.declared_metrics("mount")
        lowers = self.fx.stack_lowers(self.sizes.mount_depth)
        d = self._scratch()
        u, w, m = (os.path.join(d, x) for x in ("u", "w", "m"))
        for x in (u, w, m):
            os.mkdir(x)
        out = {}
        try:
            drop_caches()
            t0 = time.perf_counter()
            h = self._mount(t, lowers, u, w, m)
            out[first] = time.perf_counter() - t0
            os.stat(os.path.join(m, "usr/lib/d00/f000"))
            self._finish(t, h)
            t0 = time.perf_counter()
            h = self._mount(t, lowers, u, w, m)
            out[again] = time.perf_counter() - t0
            os.stat(os.path.join(m, "usr/lib/d00/f000"))
            self._finish(t, h)
        finally:
            cleanup_active_under(m)
            self._remove(d)
        return out

    def wl_stat(self, t: Target) -> dict:
        rel = self.fx.stat_paths()
        out = {}
        names = self.declared_metrics("stat")
        for i, depth in enumerate(self.sizes.depths):
            cold, warm = names[2 * i], names[2 * i + 1]
            try:
                with self.view(t, self.fx.stack_lowers(depth)) as v:
                    paths = [os.path.join(v.path, p) for p in rel]
                    st = os.stat
                    drop_caches()
                    t0 = time.perf_counter()
                    for p in paths:
                        st(p)
                    out[cold] = time.perf_counter() - t0
                    for attempt in range(DROP_RETRIES + 1):
                        watch = DropWatch()
                        t1 = time.perf_counter()
                        for p in paths:
                            st(p)
                        out[warm] = time.perf_counter() - t1
                        foreign = watch.foreign()
                        if foreign <= 0:
                            break
                        if attempt < DROP_RETRIES:
                            log(f"stat {depth} layers {t.name}: another process dropped the "
                                f"caches ({foreign}) during the warm pass; re-warming, repeating it")
                            for p in paths:
                                st(p)
                            continue
                        self.tainted.add((warm, t.name))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                # one depth failing (e.g. too many layers) must not hide the others
                err = self._cell_error(e)
                for n in (cold, warm):
                    self.record_error(n, t.name, err)
                log(f"stat {depth} layers {t.name}: FAILED {e}")
        return out

    def _walk_cmd(self, t: Target, cmd: List[str], what: str) -> dict:
        cold_n, warm_n = self.declared_metrics(what)
        with self.view(t, [self.fx.image]) as v:
            drop_caches()
            c, out1 = self._timed_cmd([*cmd, v.path] if what != "tar" else cmd, cwd=v.path)
            w, out2 = self._timed_cmd([*cmd, v.path] if what != "tar" else cmd, cwd=v.path)
        if what == "find":
            self.check("find: entries listed", t.name, len(out1.splitlines()))
            self.check("find: entries listed", t.name, len(out2.splitlines()))
        elif what == "du":
            self.check("du -s: total KiB", t.name, out1.split()[0])
        elif what == "tar":
            self.check("tar -c tree: archive bytes", t.name, out1.strip())
            self.check("tar -c tree: archive bytes", t.name, out2.strip())
        return {cold_n: c, warm_n: w}

    def wl_find(self, t: Target) -> dict:
        return self._walk_cmd(t, ["find"], "find")

    def wl_du(self, t: Target) -> dict:
        return self._walk_cmd(t, ["du", "-s"], "du")

    def wl_tar(self, t: Target) -> dict:
        # to a pipe, not to /dev/null: GNU tar skips reading file data when the archive is
        # /dev/null, and we want the data read
        return self._walk_cmd(t, ["sh", "-c", "tar -cf - tree | wc -c"], "tar")

    def wl_rss(self, t: Target) -> dict:
        if t.kind != "fuse":
            raise NotApplicable("no daemon" if t.kind == "kernel" else "no mount")
        idle, walked = self.declared_metrics("rss")
        with self.view(t, [self.fx.image]) as v:
            r0 = vmrss_mib(v.pid)
            self._timed_cmd(["du", "-s", v.path])
            r1 = vmrss_mib(v.pid)
        return {idle: r0, walked: r1}

    def wl_read(self, t: Target) -> dict:
        cold, warm = self.declared_metrics("read")
        size = self.sizes.big_bytes
        with self.view(t, [self.fx.image]) as v:
            p = os.path.join(v.path, "big.bin")
            drop_caches()
            c = read_file(p, size)
            w = read_file(p, size)
            same_blocks(p, os.path.join(self.fx.image, "big.bin"), size)
        return {cold: size / c / 1e6, warm: size / w / 1e6}

    def wl_write(self, t: Target) -> dict:
        (name,) = self.declared_metrics("write")
        size = self.sizes.write_bytes
        buf = bytes(random.Random(7).randbytes(MiB))
        with self.view(t, [self.fx.image], plain_copy=lambda p: None) as v:
            p = os.path.join(v.path, "new.bin")
            os.sync()
            t0 = time.perf_counter()
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for _ in range(size // MiB):
                    os.write(fd, buf)
                os.fsync(fd)
            finally:
                os.close(fd)
            dt = time.perf_counter() - t0
            if os.stat(p).st_size != size:
                raise RuntimeError(f"wrote {size} bytes, file has {os.stat(p).st_size}")
        return {name: size / dt / 1e6}

    def _copyup(self, t: Target, lower_dir: str, base: Optional[str] = None) -> (float, float):
        src = os.path.join(lower_dir, "big.bin")
        size = os.stat(src).st_size
        read_file(src, size)      # lower data in the page cache: measure the fs, not the disk

        def copy(p):
            subprocess.run(["cp", "--reflink=auto", "--preserve=all", src, p], check=True)

        with self.view(t, [lower_dir], plain_copy=copy, base=base) as v:
            p = os.path.join(v.path, "big.bin")
            t0 = time.perf_counter()
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"x")
            finally:
                os.close(fd)
            append = time.perf_counter() - t0
            if os.stat(p).st_size != size + 1:
                raise RuntimeError(f"size after append {os.stat(p).st_size}, want {size + 1}")
        if base is not None:
            return append, None
        with self.view(t, [lower_dir], plain_copy=copy) as v:
            p = os.path.join(v.path, "big.bin")
            t0 = time.perf_counter()
            os.chmod(p, 0o600)
            chmod = time.perf_counter() - t0
            if os.stat(p).st_mode & 0o777 != 0o600:
                raise RuntimeError("chmod did not take")
        return append, chmod

    def wl_copyup(self, t: Target) -> dict:
        a_n, c_n = self.declared_metrics("copyup")
        a, c = self._copyup(t, self.fx.image)
        return {a_n: a, c_n: c}

    def wl_metacopy(self, t: Target) -> dict:
        """chmod, chown, utimes, setxattr: each the first metadata change of the big lower file,
        each on its own fresh mount. kernel and overlayfs-py get -o metacopy=on (a metadata-only
        copy-up: a sparse upper file with the trusted.overlay.metacopy xattr, checked after each
        operation); fuse-overlayfs has no metacopy and copies the whole file."""
        names = self.declared_metrics("metacopy")
        src = os.path.join(self.fx.image, "big.bin")
        size = os.stat(src).st_size
        read_file(src, size)      # lower data in the page cache: measure the fs, not the disk
        meta = t.name in METACOPY_TARGETS
        opts = ("metacopy=on",) if meta else ()
        xname, xvalue = "user.bench", b"metacopy"
        ops = {
            "chmod": (lambda p: os.chmod(p, 0o600),
                      lambda p, st: st.st_mode & 0o7777 == 0o600),
            "chown": (lambda p: os.chown(p, METACOPY_UID, -1),
                      lambda p, st: st.st_uid == METACOPY_UID),
            "utimes": (lambda p: os.utime(p, (METACOPY_TIME, METACOPY_TIME)),
                       lambda p, st: int(st.st_mtime) == METACOPY_TIME),
            "setxattr": (lambda p: os.setxattr(p, xname, xvalue),
                         lambda p, st: os.getxattr(p, xname) == xvalue),
        }

        def copy(p):
            subprocess.run(["cp", "--reflink=auto", "--preserve=all", src, p], check=True)

        out = {}
        for op, name in zip(METACOPY_OPS, names):
            change, took = ops[op]
            try:
                with self.view(t, [self.fx.image], plain_copy=copy, options=opts) as v:
                    p = os.path.join(v.path, "big.bin")
                    os.lstat(p)       # the lookup is not part of the measurement
                    t0 = time.perf_counter()
                    change(p)
                    dt = time.perf_counter() - t0
                    st = os.stat(p)
                    if not took(p, st):
                        raise RuntimeError(f"{op} did not take effect")
                    if st.st_size != size:
                        raise RuntimeError(f"size after {op} is {st.st_size}, want {size}")
                    if meta:
                        self._check_metacopy(t, op, os.path.join(v.base, "u", "big.bin"))
                    same_blocks(p, src, size)
                out[name] = dt
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:
                # one operation failing must not hide the others
                err = self._cell_error(e)
                self.record_error(name, t.name, err)
                log(f"metacopy {op} {t.name}: FAILED {err[:300]}")
        return out

    def _check_metacopy(self, t: Target, op: str, upper: str) -> None:
        """After a metadata change with metacopy=on, the upper file must carry the metacopy
        xattr and hold (about) no data blocks. Recorded as a consistency check, and noted when
        it fails. Outside the timed part."""
        problems = []
        try:
            ust = os.lstat(upper)
        except FileNotFoundError:
            problems.append("no upper file (no copy-up at all)")
        else:
            try:
                os.getxattr(upper, METACOPY_XATTR, follow_symlinks=False)
            except OSError as e:
                problems.append(f"no {METACOPY_XATTR} xattr ({os.strerror(e.errno)})")
            alloc = ust.st_blocks * 512
            if alloc > METACOPY_MAX_ALLOC:
                problems.append(f"{alloc / MiB:.0f} MiB of data allocated in the upper file "
                                f"(st_blocks {ust.st_blocks}): the data was copied")
        self.check(f"metacopy=on {op}: upper file is metadata-only", t.name,
                   "yes" if not problems else "NO: " + "; ".join(problems))
        if problems:
            note = f"metacopy check FAILED for {t.name}, {op}: " + "; ".join(problems)
            if note not in self.notes:
                self.notes.append(note)

    def wl_create(self, t: Target) -> dict:
        c_n, d_n = self.declared_metrics("create")
        n = self.sizes.create_n
        payload = b"z" * 512
        with self.view(t, [self.fx.image], plain_copy=lambda p: os.mkdir(os.path.join(p, "tree"))) as v:
            d = os.path.join(v.path, "tree")
            paths = [os.path.join(d, f"new-{i:05d}") for i in range(n)]
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            t0 = time.perf_counter()
            for p in paths:
                fd = os.open(p, flags, 0o644)
                os.write(fd, payload)
                os.close(fd)
            t1 = time.perf_counter()
            for p in paths:
                os.unlink(p)
            t2 = time.perf_counter()
            if any(os.path.lexists(p) for p in paths[::97]):
                raise RuntimeError("deleted files still visible")
        return {c_n: t1 - t0, d_n: t2 - t1}

    def wl_whiteout(self, t: Target) -> dict:
        (name,) = self.declared_metrics("whiteout")
        rel = self.fx.delete_list()

        def copy(p):
            for r in rel:
                dst = os.path.join(p, r)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copy2(os.path.join(self.fx.image, r), dst)

        with self.view(t, [self.fx.image], plain_copy=copy) as v:
            paths = [os.path.join(v.path, r) for r in rel]
            for p in paths:          # warm the lookups: time the deletions, not the lookups
                os.lstat(p)
            t0 = time.perf_counter()
            for p in paths:
                os.unlink(p)
            dt = time.perf_counter() - t0
            if any(os.path.lexists(p) for p in paths[::97]):
                raise RuntimeError("deleted lower files still visible")
        return {name: len(paths) / dt}

    def wl_git(self, t: Target) -> dict:
        first, second = self.declared_metrics("git")
        env = git_env(self.fx.root)
        if t.kind == "plain":
            # the worktree in place, with a private copy of the index (git status may rewrite
            # the index; it must not touch the fixture)
            d = self._scratch()
            try:
                idx = os.path.join(d, "index")
                shutil.copy2(os.path.join(self.fx.gitrepo, ".git", "index"), idx)
                env["GIT_INDEX_FILE"] = idx
                return self._git_twice(self.fx.gitrepo, env, first, second, t)
            finally:
                self._remove(d)
        with self.view(t, [self.fx.gitrepo]) as v:
            return self._git_twice(v.path, env, first, second, t)

    def _git_twice(self, path: str, env: dict, first: str, second: str, t: Target) -> dict:
        out = {}
        for name in (first, second):
            dt, text = self._timed_cmd(["git", "status", "--porcelain"], cwd=path, env=env)
            out[name] = dt
            self.check("git status: changed paths", t.name, len(text.splitlines()))
        return out

    def wl_compileall(self, t: Target) -> dict:
        (name,) = self.declared_metrics("compileall")

        def copy(p):
            shutil.copytree(os.path.join(self.fx.image, "pkg"), os.path.join(p, "pkg"), symlinks=True)

        with self.view(t, [self.fx.image], plain_copy=copy) as v:
            dt, _ = self._timed_cmd([sys.executable, "-m", "compileall", "-q", "pkg"], cwd=v.path)
            npyc = sum(1 for _d, _s, fs in os.walk(os.path.join(v.path, "pkg"))
                       for f in fs if f.endswith(".pyc"))
            self.check("compileall: .pyc written", t.name, npyc)
        return {name: dt}

    def wl_reflink(self, t: Target) -> dict:
        (name,) = self.declared_metrics("reflink")
        if self.xfs_error:
            raise NotApplicable(self.xfs_error)
        if self.xfs_lower is None:
            self.xfs = XfsImage(self.fx)
            try:
                self.xfs_lower = self.xfs.setup()
            except NotApplicable as e:
                self.xfs_error = str(e)
                raise
            except Exception as e:
                self.xfs_error = f"xfs setup failed: {e}"
                raise NotApplicable(self.xfs_error)
        a, _ = self._copyup(t, self.xfs_lower, base=os.path.join(self.xfs.mnt, "run"))
        return {name: a}

    # ---------------------------------------------------------------- reporting
    def summary(self) -> dict:
        cols = [t.name for t in self.targets]
        rows = {}
        for name, m in self.metrics.items():
            row = {}
            for c in cols:
                vals = self.values.get(name, {}).get(c, [])
                errs = self.errors.get(name, {}).get(c, [])
                na = self.na.get(name, {}).get(c)
                cell = {"values": vals}
                if vals:
                    cell["median"] = statistics.median(vals)
                if errs:
                    cell["errors"] = errs
                if na:
                    cell["na"] = na
                if (name, c) in self.tainted:
                    cell["tainted"] = True
                row[c] = cell
            for c in cols:
                if c != "plain" and "median" in row[c]:
                    r = self.paired(name, c, name, "plain", m.higher_better)
                    if r is not None:
                        row[c]["vs_plain"] = r
            if m.depth is not None and m.depth != self.sizes.depths[0]:
                base = self.stat_name(self.sizes.depths[0], m.cold)
                for c in cols:
                    if c == "plain":
                        continue          # plain stats the bottom layer alone at every depth
                    if "median" in row[c]:
                        r = self.paired(name, c, base, c, False)
                        if r is not None:
                            row[c]["vs_1layer"] = r
            rows[name] = {"unit": m.unit, "higher_is_better": m.higher_better, "cells": row}
        return rows

    def consistency_notes(self) -> List[str]:
        notes = []
        for what, per in sorted(self.checks.items()):
            if what == "du -s: total KiB":
                continue            # block accounting may legitimately differ by a few KiB
            seen = {tn: sorted(v, key=str) for tn, v in per.items()}
            distinct = {str(v) for vs in seen.values() for v in vs}
            if len(distinct) > 1:
                notes.append(f"MISMATCH {what}: " + "; ".join(f"{k}={v}" for k, v in seen.items()))
        return notes

    def table(self, rows: dict) -> str:
        return render_table(rows, [t.name for t in self.targets])


def spread_notes(rows: dict) -> List[str]:
    """Cells whose repetitions disagree wildly: the median hides an outlier worth knowing."""
    notes = []
    for name, row in rows.items():
        for target, cell in row["cells"].items():
            vals = cell.get("values") or []
            if len(vals) >= 2 and min(vals) > 0 and max(vals) / min(vals) > 5 and \
                    (row["unit"] != "s" or max(vals) - min(vals) > 0.05):
                shown = ", ".join(fmt_value(v, row["unit"]) for v in vals)
                notes.append(f"wide spread in '{name}' for {target}: {shown} (median shown)")
    return notes


def render_table(rows: dict, cols: List[str]) -> str:
    foot: List[str] = []

    def footnote(text: str) -> str:
        text = " ".join(text.split())
        if len(text) > 300:
            text = text[:300] + "…"
        if text not in foot:
            foot.append(text)
        return f"n/a[{foot.index(text) + 1}]"

    lines = ["| workload | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, row in rows.items():
        cells = []
        for c in cols:
            cell = row["cells"][c]
            if "median" in cell:
                s = fmt_value(cell["median"], row["unit"])
                extra = []
                if cell.get("vs_plain") is not None:
                    extra.append(fmt_ratio(cell["vs_plain"]))
                if cell.get("vs_1layer") is not None:
                    extra.append(f"{fmt_ratio(cell['vs_1layer'])} 1L")
                if extra:
                    s += " (" + ", ".join(extra) + ")"
                if cell.get("tainted"):
                    s += " †"
                nerr = len(cell.get("errors", []))
                if nerr:
                    s += f" [{len(cell['values'])}/{len(cell['values']) + nerr} ok: " \
                         f"{footnote(cell['errors'][0])[3:]}]"
                cells.append(s)
            elif cell.get("na"):
                cells.append(footnote(cell["na"]))
            elif cell.get("errors"):
                cells.append(footnote("failed: " + cell["errors"][0]))
            else:
                cells.append("–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    if any(c.get("tainted") for row in rows.values() for c in row["cells"].values()):
        foot_t = ("† another process wrote to /proc/sys/vm/drop_caches during this cell in "
                  f"every one of {DROP_RETRIES + 1} attempts of at least one repetition; "
                  "its warm figures may be partly cold")
        out += "\n\n" + foot_t
    if foot:
        out += "\n\n" + "\n".join(f"[{i + 1}] {f}" for i, f in enumerate(foot))
    return out


def cleanup_active_under(mnt: str) -> None:
    for m in list(ACTIVE):
        if m.mnt == mnt:
            m.unmount()


def vmrss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def same_blocks(path: str, ref: str, size: int) -> None:
    """The first, a middle and the last MiB read through the mount equal the lower file's."""
    with open(path, "rb") as a, open(ref, "rb") as b:
        for off in (0, (size // 2) & ~(MiB - 1), size - MiB):
            if os.pread(a.fileno(), MiB, off) != os.pread(b.fileno(), MiB, off):
                raise RuntimeError(f"data read through the mount differs at offset {off}")


def read_file(path: str, size: int) -> float:
    buf = bytearray(MiB)
    t0 = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
    dt = time.perf_counter() - t0
    if n != size:
        raise RuntimeError(f"read {n} bytes from {path}, want {size}")
    return dt


# --------------------------------------------------------------------------------------------
# machine info and result files

def machine_info(cache: str) -> dict:
    def cmd(*a):
        try:
            return subprocess.run(a, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f"{int(f.readline().split()[1]) / 1024 / 1024:.1f} GiB"
    fstype = " ".join(cmd("findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", cache).split())
    ovl = {}
    pdir = "/sys/module/overlay/parameters"
    if os.path.isdir(pdir):
        for p in sorted(os.listdir(pdir)):
            with contextlib.suppress(OSError), open(os.path.join(pdir, p)) as f:
                ovl[p] = f.read().strip()
    return {
        "kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(), "memory": mem,
        "cache_fs": fstype, "python": platform.python_version(),
        "fuse_overlayfs": [ln for ln in cmd("fuse-overlayfs", "--version").splitlines()
                           if ln.startswith("fuse-overlayfs")][:1],
        "overlay_params": ovl,
        "repo_commit": cmd("git", "-C", REPO, "rev-parse", "--short", "HEAD"),
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


def render_section(mode: str, meta: dict, table: str, notes: List[str]) -> str:
    mi = meta["machine"]
    s = meta["sizes"]
    fo = (mi.get("fuse_overlayfs") or ["?"])[0]
    lines = [
        f"## {'Quick' if mode == 'quick' else 'Full'} run — {meta['date']}",
        "",
        (f"**QUICK MODE: small fixtures ({kfmt(s['tree_files'])} files, "
         f"{human_bytes(s['big_bytes'])} file, stacks {'/'.join(map(str, s['depths']))}, "
         f"{kfmt(s['stat_paths'])} stats). Not comparable with full-mode figures.**\n"
         if mode == "quick" else
         f"Full fixtures: {kfmt(s['tree_files'])} files in {kfmt(s['tree_dirs'])} dirs + "
         f"{human_bytes(s['big_bytes'])} file, stacks {'/'.join(map(str, s['depths']))}, "
         f"{kfmt(s['stat_paths'])} stats.\n"),
        f"- machine: {mi['cpus']}× {mi['cpu']}, {mi['memory']} RAM, kernel {mi['kernel']}, "
        f"layers on {mi['cache_fs']}",
        f"- {fo}; overlay module params: " +
        ", ".join(f"{k}={v}" for k, v in mi["overlay_params"].items()),
        f"- python {mi['python']}, repo at {mi['repo_commit']}, overlayfs-py command: "
        f"`{meta['ours_cmd']}`",
        f"- {meta['reps']} repetitions per cell, targets interleaved; the value is the median; "
        f"(R×) = median over repetitions of (target ÷ plain) in the same repetition, i.e. times "
        f"slower than plain (rates: plain ÷ target); `1L` = the same for this target's 1-layer "
        f"stat time",
        f"- wall time {meta['wall_seconds'] / 60:.1f} min, of which fixture build "
        f"{meta['fixture_build_seconds']:.0f} s (the fixtures took "
        f"{sum(v.get('build_seconds', 0) for v in meta['fixtures'].values()):.0f} s when first "
        f"built, then are reused) and host-cache priming {meta.get('prime_seconds', 0):.0f} s; "
        f"load average at start "
        f"{' '.join(mi['loadavg'])}, at end {' '.join(meta.get('loadavg_end', []))} "
        f"(2 vCPUs, shared with other work: see README)",
        f"- raw data: `benchmarks/{meta['json_name']}`",
        "",
        table,
    ]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


RESULTS_HEADER = """# Benchmark results

Produced by `benchmarks/bench.py --write-results` (`make bench` / `make bench-quick`);
see `benchmarks/README.md` for what each workload does and how to read the ratios.
Each section is replaced by the next run of the same mode; the hand-written observations
section is kept (check the run it refers to).
"""


def update_results_md(path: str, mode: str, section: str) -> None:
    blocks: Dict[str, str] = {}
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        import re
        for m in re.finditer(r"<!-- BEGIN (\w+) -->\n(.*?)<!-- END \1 -->", text, re.S):
            blocks[m.group(1)] = m.group(2)
    blocks[mode] = section
    fixed = ("full", "observations", "quick")     # observations: hand-written, kept as is
    order = [m for m in fixed if m in blocks] + [m for m in blocks if m not in fixed]
    out = RESULTS_HEADER + "".join(f"\n<!-- BEGIN {m} -->\n{blocks[m]}<!-- END {m} -->\n"
                                   for m in order)
    with open(path, "w") as f:
        f.write(out)


# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small fixtures; finishes in minutes")
    p.add_argument("--cache", default=os.path.join(HERE, "cache"),
                   help="fixture and scratch directory (default benchmarks/cache)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per cell (default 3)")
    p.add_argument("--targets", help="comma list from " + ",".join(TARGET_ORDER))
    p.add_argument("--only", help="comma list of workloads to run")
    p.add_argument("--skip", help="comma list of workloads to skip")
    p.add_argument("--list", action="store_true", help="list workloads and exit")
    p.add_argument("--ours-cmd", help="command for the overlayfs-py target "
                   "(default: the project venv python -m overlayfs_py; env OVL_BENCH_OURS)")
    p.add_argument("--xfs", dest="xfs", action="store_true", default=None,
                   help="run the reflink workload on an xfs loop image (default: if mkfs.xfs exists)")
    p.add_argument("--no-xfs", dest="xfs", action="store_false")
    p.add_argument("--cell-timeout", type=float,
                   help="seconds one target may spend on one repetition of one workload before "
                        "its daemon is killed (default 1800; 300 with --quick)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the fixtures")
    p.add_argument("--write-results", action="store_true",
                   help="replace this mode's section of benchmarks/RESULTS.md")
    p.add_argument("--render", metavar="JSON",
                   help="only re-render the table of a saved result file (no benchmarking)")
    p.add_argument("--json", help="result file (default benchmarks/results-DATE-MODE.json)")
    args = p.parse_args(argv)
    if args.cell_timeout is None:
        args.cell_timeout = 300.0 if args.quick else 1800.0
    if args.xfs is None:
        args.xfs = shutil.which("mkfs.xfs") is not None
    return args


def render_only(args: argparse.Namespace) -> int:
    """Re-render the table (and with --write-results, the RESULTS.md section) of a saved run."""
    with open(args.render) as f:
        data = json.load(f)
    meta, rows = data["meta"], data["results"]
    notes = [n for n in data.get("notes", []) if not n.startswith("wide spread")]
    notes += spread_notes(rows)
    table = render_table(rows, meta["targets"])
    print(table)
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    if args.write_results:
        path = os.path.join(HERE, "RESULTS.md")
        update_results_md(path, meta["mode"], render_section(meta["mode"], meta, table, notes))
        print(f"updated {path}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        return render_only(args)
    bench = Bench(args)
    if args.list:
        for wl, _ in bench.workloads():
            print(f"{wl:11s} " + "; ".join(bench.declared_metrics(wl)))
        return 0
    if os.geteuid() != 0:
        print("bench.py needs root (mounts, drop_caches)", file=sys.stderr)
        return 2

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)       # unwinds through every finally: unmounts
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(cleanup_active)

    start = time.monotonic()
    date = datetime.datetime.now().astimezone()
    os.makedirs(bench.cache, exist_ok=True)
    cleanup_stale(bench.cache)
    shutil.rmtree(bench.run_root, ignore_errors=True)
    os.makedirs(bench.run_root)
    machine = machine_info(bench.cache)
    t0 = time.monotonic()
    bench.fx.build()
    build_s = time.monotonic() - t0
    prime_s = bench.fx.prime()
    log(f"primed the host's cache of the fixtures in {prime_s:.1f} s")
    ours_t = next((t for t in bench.targets if t.name == "overlayfs-py"), None)
    log(f"mode {bench.sizes.mode}, targets {[t.name for t in bench.targets]}, reps {args.reps}; "
        f"overlayfs-py = {' '.join(ours_t.cmd) if ours_t else '-'}")
    try:
        bench.run()
    finally:
        cleanup_active()
        if bench.xfs:
            bench.xfs.teardown()
        shutil.rmtree(bench.run_root, ignore_errors=True)
    wall = time.monotonic() - start

    rows = bench.summary()
    table = bench.table(rows)
    notes = bench.consistency_notes() + bench.notes + spread_notes(rows)
    ours = next((t for t in bench.targets if t.name == "overlayfs-py"), None)
    stamp = date.strftime("%Y%m%d-%H%M%S")
    json_path = args.json or os.path.join(HERE, f"results-{stamp}-{bench.sizes.mode}.json")
    meta = {
        "date": date.strftime("%Y-%m-%d %H:%M %Z"), "mode": bench.sizes.mode,
        "sizes": asdict(bench.sizes), "reps": args.reps, "machine": machine,
        "targets": [t.name for t in bench.targets],
        "ours_cmd": shlex.join(ours.cmd) if ours else None,
        "fixtures": bench.fx.meta, "wall_seconds": round(wall, 1),
        "fixture_build_seconds": round(build_s, 1), "prime_seconds": round(prime_s, 1),
        "json_name": os.path.basename(json_path),
        "loadavg_end": open("/proc/loadavg").read().split()[:3],
    }
    with open(json_path, "w") as f:
        checks = {w: {t: sorted(v, key=str) for t, v in per.items()}
                  for w, per in bench.checks.items()}
        json.dump({"meta": meta, "results": rows, "checks": checks, "notes": notes}, f,
                  indent=1, default=str)
    print()
    print(f"{bench.sizes.mode} run, {args.reps} reps, {wall / 60:.1f} min wall (value: median; "
          f"ratio: times slower than plain, paired per repetition; 1L: vs the same target's "
          f"1-layer time)")
    print(table)
    if notes:
        print("\nNotes:\n" + "\n".join(f"- {n}" for n in notes))
    print(f"\nJSON: {json_path}")
    if args.write_results:
        path = os.path.join(HERE, "RESULTS.md")
        update_results_md(path, bench.sizes.mode, render_section(bench.sizes.mode, meta, table, notes))
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
