"""One soak client: a mixed workload on its own part of the tree, checked against a model.

Client ``c`` owns ``c{c}/`` (merged from three lower layers) and the names ``s{c}_*`` in the
shared directory ``shared/`` (which all clients change at once). It keeps a model of every
file it owns -- content, mode, one xattr -- and checks each result against it: a write is
read back, a listing must show exactly the model's names, a stat the model's mode. Every
OSError and every mismatch is an error: no two clients touch the same name, so no errno
is expected.

While a syscall is in flight the client's slot in ``busy`` holds its start time (the
driver's watchdog fails the run if one takes more than 10 s) and ``ops`` counts what it did.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import time
from typing import Dict, List, Tuple

DIRS = ("a", "b")
NAMES = 24                      # file names per directory a client draws from (bounded)
SUBDIRS = 3                     # lower subdirectories per client, removed and made again
XATTR = "user.soak"


# --------------------------------------------------------------------------------------------
# the lower layers (deterministic, so that a client knows its starting tree)
# --------------------------------------------------------------------------------------------

def lower_content(layer: int, rel: str) -> bytes:
    rnd = random.Random(f"{layer}:{rel}")
    return (f"{rel} from lower{layer}\n".encode() * rnd.randint(1, 400))


def layer_specs(clients: int) -> List[Dict[str, bytes]]:
    """Three lower layers, top first: each client's dirs are merged from all three, some
    names exist in several layers (the top one wins), and each has lower subdirectories
    (one of them merged from two layers) to empty and rmdir."""
    layers: List[Dict[str, bytes]] = [{}, {}, {}]
    for c in range(clients):
        for d in DIRS:
            for i in range(0, 10):
                layer = i % 3
                rel = f"c{c}/{d}/f{i}"
                layers[layer][rel] = lower_content(layer, rel)
                if i % 4 == 0 and layer < 2:          # also present, hidden, further down
                    layers[2][rel] = lower_content(2, rel)
        for j in range(SUBDIRS):
            for k in range(2):
                rel = f"c{c}/sub{j}/x{k}"
                layer = (j + k) % 3
                layers[layer][rel] = lower_content(layer, rel)
        layers[1][f"shared/s{c}_lower"] = lower_content(1, f"shared/s{c}_lower")
    return layers


def initial_model(c: int, specs) -> Tuple[Dict[str, dict], set]:
    files: Dict[str, dict] = {}
    dirs = {f"c{c}", f"c{c}/a", f"c{c}/b"} | {f"c{c}/sub{j}" for j in range(SUBDIRS)}
    for layer in (2, 1, 0):                           # bottom first: the top one wins
        for rel, data in specs[layer].items():
            if rel.startswith(f"c{c}/") or rel.startswith(f"shared/s{c}_"):
                files[rel] = {"sha": hashlib.sha256(data).hexdigest(), "size": len(data),
                              "mode": 0o644, "xattr": None}
    return files, dirs


# --------------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------------

class Mismatch(Exception):
    pass


class Client:
    def __init__(self, c: int, mnt: str, specs, busy, ops, seed: int):
        self.c, self.mnt, self.busy, self.ops = c, mnt, busy, ops
        self.rnd = random.Random(seed)
        self.files, self.dirs = initial_model(c, specs)
        self.errors: List[str] = []
        self.counts: Dict[str, int] = {}

    def p(self, rel: str) -> str:
        return os.path.join(self.mnt, rel)

    def call(self, fn, *args):
        self.busy[self.c] = time.time()
        try:
            return fn(*args)
        finally:
            self.busy[self.c] = 0.0

    # ---- helpers
    def _owned_dirs(self) -> List[str]:
        return sorted(d for d in self.dirs if d != f"c{self.c}") + ["shared"]

    def _files_in(self, d: str) -> List[str]:
        pre = d + "/"
        own = f"shared/s{self.c}_"
        return [f for f in self.files if f.startswith(pre) and "/" not in f[len(pre):]
                and (d != "shared" or f.startswith(own))]

    def _new_name(self, d: str) -> str:
        base = f"s{self.c}_n" if d == "shared" else "n"
        return f"{d}/{base}{self.rnd.randrange(NAMES)}"

    def _write(self, rel: str, data: bytes, flags: int) -> None:
        fd = self.call(os.open, self.p(rel), flags, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = self.call(os.write, fd, view)
                view = view[n:]
        finally:
            self.call(os.close, fd)

    def _read(self, rel: str) -> bytes:
        fd = self.call(os.open, self.p(rel), os.O_RDONLY)
        try:
            chunks = []
            while True:
                b = self.call(os.read, fd, 1 << 20)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
        finally:
            self.call(os.close, fd)

    def _verify(self, rel: str, data: bytes = None) -> None:
        got = self._read(rel) if data is None else data
        want = self.files[rel]
        if hashlib.sha256(got).hexdigest() != want["sha"]:
            raise Mismatch(f"{rel}: content differs ({len(got)} bytes, model {want['size']})")

    def _payload(self) -> bytes:
        n = self.rnd.choice((100, 3000, 20000, 70000))
        return (f"<{self.c}:{self.rnd.random()}>".encode() * (n // 20 + 1))[:n]

    # ---- operations (each one keeps the model in step)
    def op_create(self):
        d = self.rnd.choice(self._owned_dirs())
        rel = self._new_name(d)
        if rel in self.files:
            return self.op_append(rel)
        data = self._payload()
        self._write(rel, data, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self.files[rel] = {"sha": hashlib.sha256(data).hexdigest(), "size": len(data),
                           "mode": 0o644, "xattr": None}
        self._verify(rel)

    def op_append(self, rel=None):
        rel = rel or self._pick()
        if rel is None:
            return
        old = self._read(rel)
        self._verify(rel, old)
        extra = self._payload()[:5000]
        self._write(rel, extra, os.O_WRONLY | os.O_APPEND)
        new = old + extra
        self.files[rel].update(sha=hashlib.sha256(new).hexdigest(), size=len(new))
        self._verify(rel)

    def op_read(self):
        rel = self._pick()
        if rel is not None:
            self._verify(rel)

    def op_rename(self):
        rel = self._pick()
        if rel is None:
            return
        d = self.rnd.choice(self._owned_dirs())
        dst = self._new_name(d)
        if dst == rel:
            return
        self.call(os.rename, self.p(rel), self.p(dst))
        self.files[dst] = self.files.pop(rel)       # replaces dst, if it existed
        self._verify(dst)

    def op_unlink(self):
        rel = self._pick()
        if rel is None:
            return
        self.call(os.unlink, self.p(rel))
        del self.files[rel]
        if self.rnd.random() < 0.5:
            r = self._try(os.stat, self.p(rel))
            if r != errno.ENOENT:
                raise Mismatch(f"{rel}: stat after unlink gave {r}")

    def op_dirs(self):
        """Empty and rmdir a directory (lower, merged or ours), or make one (over a
        whiteout when it was a lower one)."""
        c = self.c
        subs = [f"c{c}/sub{j}" for j in range(SUBDIRS)] + [f"c{c}/d{j}" for j in range(2)]
        d = self.rnd.choice(subs)
        if d in self.dirs:
            for f in self._files_in(d):
                self.call(os.unlink, self.p(f))
                del self.files[f]
            self.call(os.rmdir, self.p(d))
            self.dirs.discard(d)
        else:
            self.call(os.mkdir, self.p(d), 0o755)
            self.dirs.add(d)
            if self.call(os.listdir, self.p(d)):
                raise Mismatch(f"{d}: a new directory is not empty")

    def op_chmod(self):
        rel = self._pick()
        if rel is None:
            return
        mode = self.rnd.choice((0o600, 0o640, 0o644, 0o664, 0o755))
        self.call(os.chmod, self.p(rel), mode)
        self.files[rel]["mode"] = mode
        got = stat.S_IMODE(self.call(os.stat, self.p(rel)).st_mode)
        if got != mode:
            raise Mismatch(f"{rel}: mode {oct(got)} after chmod {oct(mode)}")

    def op_xattr(self):
        rel = self._pick()
        if rel is None:
            return
        value = f"{self.c}-{self.rnd.randrange(1 << 30)}".encode()
        self.call(os.setxattr, self.p(rel), XATTR, value)
        self.files[rel]["xattr"] = value.decode()
        got = self.call(os.getxattr, self.p(rel), XATTR)
        if got != value:
            raise Mismatch(f"{rel}: xattr {got!r} after setxattr {value!r}")

    def op_readdir(self):
        d = self.rnd.choice(self._owned_dirs())
        names = self.call(os.listdir, self.p(d))
        if d == "shared":
            names = [n for n in names if n.startswith(f"s{self.c}_")]
        want = sorted(f.rsplit("/", 1)[1] for f in self._files_in(d))
        want += sorted(x.rpartition("/")[2] for x in self.dirs if x.rpartition("/")[0] == d)
        if sorted(names) != sorted(want):
            raise Mismatch(f"{d}: listing {sorted(names)} != model {sorted(want)}")

    def _pick(self):
        if not self.files:
            return None
        return self.rnd.choice(sorted(self.files))

    @staticmethod
    def _try(fn, *a):
        try:
            fn(*a)
            return 0
        except OSError as e:
            return e.errno

    OPS = (("create", 16), ("append", 12), ("read", 20), ("rename", 10), ("unlink", 8),
           ("dirs", 4), ("chmod", 6), ("xattr", 6), ("readdir", 10))

    def run(self, until: float) -> None:
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        while time.time() < until:
            name = self.rnd.choices(names, weights)[0]
            try:
                getattr(self, "op_" + name)()
            except OSError as e:
                self.errors.append(f"{name}: {errno.errorcode.get(e.errno, e.errno)}: {e}")
                if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                    break                             # the mount is gone
                self._resync()
            except Mismatch as e:
                self.errors.append(f"{name}: {e}")
                self._resync()
            self.counts[name] = self.counts.get(name, 0) + 1
            self.ops[self.c] += 1
            if len(self.errors) > 50:
                break

    def _resync(self) -> None:
        """After an error the model may be wrong about one name: drop what cannot be
        trusted any more, so that one error is reported once, not at every later step."""
        for rel in list(self.files):
            try:
                os.lstat(self.p(rel))
            except OSError:
                del self.files[rel]

    def report(self) -> dict:
        return {"client": self.c, "errors": self.errors, "counts": self.counts,
                "files": self.files, "dirs": sorted(self.dirs)}


def main(c: int, mnt: str, specs, busy, ops, seed: int, until: float, out: str) -> None:
    cl = Client(c, mnt, specs, busy, ops, seed)
    try:
        cl.run(until)
    except BaseException as e:                       # reported, never a silent death
        cl.errors.append(f"client crashed: {type(e).__name__}: {e}")
    with open(out, "w") as f:
        json.dump(cl.report(), f)
