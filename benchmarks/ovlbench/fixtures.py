"""Fixtures: the sizes of a run (full or quick) and the deterministic trees every workload
reads, built once under CACHE/MODE/ and reused."""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

from .common import GiB, MiB, count_entries, git_env, log, set_tree_mtimes

FIXTURE_VERSION = 3
FIXED_MTIME = 1577836800          # 2020-01-01T00:00:00Z, every fixture file and directory

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
        # gc.auto=0: no detached "git gc --auto" repacking the objects while we prime them
        run("-c", "user.name=bench", "-c", "user.email=bench@example.invalid",
            "-c", "gc.auto=0", "commit", "-q", "-m", "fixture")
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
                    try:
                        with open(p, "rb", buffering=0) as f:
                            while f.readinto(buf):
                                pass
                    except FileNotFoundError:    # git repacked it meanwhile (older fixture)
                        continue
        return time.monotonic() - t0

    def stat_paths(self) -> List[str]:
        nd = max(1, self.sizes.stat_paths // 100)
        return [f"usr/lib/d{k:02d}/f{m:03d}" for k in range(nd) for m in range(100)]

    def stack_lowers(self, depth: int) -> List[str]:
        """Top first, like lowerdir=."""
        return [os.path.join(self.stack, str(i)) for i in reversed(range(depth))]

