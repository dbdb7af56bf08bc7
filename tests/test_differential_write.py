"""Differential test of the write path: the same random operations are applied to the
program under test and to the kernel overlay driver, over identical copies of 2-3 lower
layers (ours in mixed formats: char 0/0 and .wh. whiteouts, xattr and .wh..wh..opq opaque
dirs; the kernel's copy converted to its own format).

After every step the merged trees must be identical and every call must have the same
outcome (same errno, or success on both). At the end both are unmounted and the upper
directories compared (workdir ignored, private bookkeeping xattrs ignored; names, types,
modes, owners, contents, whiteouts and opaque flags compared).
"""

from __future__ import annotations

import os
import stat
import sys

import pytest
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

import layerkit
import writekit as wk

pytestmark = [
    pytest.mark.timeout(1200),        # shrinking a failure mounts twice per attempt
    pytest.mark.mount,
    pytest.mark.kernel,
    pytest.mark.skipif(wk.kernel_mode(), reason="OVL_TEST_PROG=kernel: nothing to compare"),
    pytest.mark.skipif(not (wk.fuse_available() and wk.kernel_overlay_available()),
                       reason="needs /dev/fuse, fusermount3 and the kernel overlay driver as root"),
]

# The name universe: small, so that random operations collide often.
TOP = ["a", "b", "c"]
MID = ["x", "y"]
UNIVERSE = ([t for t in TOP] + [f"{t}/{m}" for t in TOP for m in MID]
            + [f"{t}/{m}/z" for t in TOP for m in MID])

# What a path can be in one lower layer ("absent" first: hypothesis shrinks towards it).
LOWER_KINDS = ["absent", "absent", "absent", "file", "file", "dir", "dir", "symlink",
               "whiteout", "wh_file", "opaque", "opq_file", "fifo", "hardlink"]

paths = st.sampled_from(UNIVERSE)
HANG_SECONDS = 15
TRACE = bool(os.environ.get("OVL_DIFF_TRACE"))
payloads = st.sampled_from([b"", b"new", b"0123456789" * 10, b"x"])


def merge_view(below, kinds):
    """The merged view {path: 'dir'|'other'} of a layer (path -> kind) over ``below``."""
    view = dict(below)

    def drop_under(p):
        for q in [q for q in view if q.startswith(p + "/")]:
            del view[q]

    for p in sorted(kinds, key=lambda q: q.count("/")):
        k = kinds[p]
        if k == "absent":
            continue
        if k in ("whiteout", "wh_file"):
            view.pop(p, None)
            drop_under(p)
        elif k in ("dir", "opaque", "opq_file"):
            if k != "dir" or view.get(p) != "dir":
                drop_under(p)
            view[p] = "dir"
        else:
            view[p] = "other"
            drop_under(p)
    return view


def _ancestors(p):
    parts = p.split("/")[:-1]
    return ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]


@st.composite
def layer_specs(draw):
    """(lowers, upper spec): 2-3 lower layers, top first, and maybe an upper with content. Generated bottom-up so that a whiteout is only put
    where it hides something that may exist below: the kernel lists whiteouts that sit in a
    directory found in a single layer (it only filters directories that are merged), a
    quirk of meaningless layers that this test does not try to reproduce."""
    n = draw(st.integers(min_value=2, max_value=3))
    with_upper = draw(st.booleans())        # an upper that already has content (kernel format)
    layers = []
    visible_below = {}         # the merged view of the layers generated so far: path -> kind
    for li in reversed(range(n + with_upper)):
        spec = {}
        kinds = {}
        for p in UNIVERSE:
            parent = p.rpartition("/")[0]
            if parent and kinds.get(parent) not in ("dir", "opaque", "opq_file"):
                continue
            k = draw(st.sampled_from(LOWER_KINDS))
            if with_upper and li == 0:
                k = {"wh_file": "whiteout", "opq_file": "opaque"}.get(k, k)
            if k in ("whiteout", "wh_file") and parent and (
                    visible_below.get(parent) != "dir" or
                    any(kinds.get(a) != "dir" for a in _ancestors(p))):
                # the parent must merge with a directory below: an opaque parent, or an
                # opaque ancestor (whose subtree then comes from this layer alone), would
                # leave the whiteout in a directory only one layer contributes to
                k = "absent"
            kinds[p] = k
            if k == "absent":
                continue
            if k == "hardlink":
                files = [q for q, kq in kinds.items() if kq == "file"]
                if not files:
                    kinds[p] = "absent"
                    continue
                spec[p] = layerkit.Hardlink(draw(st.sampled_from(files)))
            elif k == "file":
                spec[p] = layerkit.File(f"layer{li}:{p}\n",
                                        mode=draw(st.sampled_from([0o644, 0o600, 0o666])),
                                        uid=draw(st.sampled_from([None, 1000])),
                                        xattrs=draw(st.sampled_from([{}, {"user.k1": b"low"}])))
            elif k == "dir":
                spec[p] = layerkit.Dir(mode=draw(st.sampled_from([0o755, 0o777, 0o1777, 0o700])),
                                       uid=draw(st.sampled_from([None, 1000])),
                                       xattrs=draw(st.sampled_from([{}, {"user.k2": b"d"}])))
            elif k == "symlink":
                spec[p] = layerkit.Symlink(draw(st.sampled_from(["x", "../a", "nowhere", "z"])))
            elif k == "whiteout":
                spec[p] = layerkit.WHITEOUT_KERNEL
            elif k == "wh_file":
                spec[p] = layerkit.WHITEOUT_OCI
            elif k == "opaque":
                spec[p] = layerkit.OPAQUE_KERNEL
            elif k == "opq_file":
                spec[p] = layerkit.OPAQUE_OCI
            elif k == "fifo":
                spec[p] = layerkit.FIFO
        visible_below = merge_view(visible_below, kinds)
        layers.append(spec)
    layers.reverse()
    if with_upper:
        return layers[1:], layers[0]
    return layers, {}


MODES = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o000, 0o777, 0o1777])
OWNERS = st.sampled_from([(0, 0), (1000, 1000), (-1, 1000), (1000, -1)])


def _write_fd(path, flags, data, mode=0o664):
    fd = os.open(path, flags | os.O_NONBLOCK, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read_fd(path):
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.read(fd, 100)
    finally:
        os.close(fd)


_USER_OPS = {
    "create": lambda p: _write_fd(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, b"user"),
    "append": lambda p: _write_fd(p, os.O_WRONLY | os.O_APPEND, b"+user"),
    "read": _read_fd,
    "mkdir": lambda p: os.mkdir(p, 0o775),
    "unlink": os.unlink,
    "rmdir": os.rmdir,
    "chmod": lambda p: os.chmod(p, 0o640),
}


def run_as(uid, gid, what, path):
    """Run one operation as uid/gid in a child process (writekit.run_as); returns the errno
    name or 'ok' (raises nothing: the result is compared)."""
    op = _USER_OPS[what]
    return wk.run_as(uid, gid, lambda: op(path))


def _is_lower_alias(mnt, upper, rel):
    """Whether ``rel`` is one of several names of one *lower* hard link in the merged view
    under ``mnt`` (the kernel overlay's, whose ``upper`` dir is given).

    Such names are one FUSE inode to the kernel and to us, separate objects on the kernel
    overlay without index=on (README, known divergences: "Several names of one lower hard
    link in use at once"), so anything that changes, copies up, renames or removes one of
    them diverges. Every rule that may do that excludes them through ``no_alias``. A name
    already in the upper layer is a real file of its own (an upper hard link is one file on
    both), so it never counts."""
    path = os.path.join(mnt, rel)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode) or os.path.lexists(os.path.join(upper, rel)):
        return False
    names = 0
    for dirpath, dirs, files in os.walk(mnt):
        for n in files + dirs:
            try:
                s = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            names += (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino)
            if names > 1:
                return True
    return False


class OverlayWriteMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = None
        self.fds = []              # open (ours, kernel) fd pairs
        self.ours = None
        self.kern = None

    # -- setup / teardown -----------------------------------------------------------------

    @initialize(specs=layer_specs())
    def setup_layers(self, specs):
        specs, upper_spec = specs
        import contextlib
        import tempfile
        self.tmp = tempfile.mkdtemp(prefix="ovl-diff-")
        os.chmod(self.tmp, 0o755)            # the unprivileged user of as_user must get in
        self.exits = contextlib.ExitStack()
        self.ours = wk.Stack(self.tmp, specs, name="ours", upper_spec=upper_spec)
        self.kern = self.ours.clone("kern", kernel_format=True)
        self.ours.mount_ours(self.exits)
        self.kern.mount_kernel(self.exits)
        self.conn = wk.fuse_conn(self.ours.mnt)

    def teardown(self):
        if self.tmp is None:
            return
        try:
            for fo, fk in self.fds:
                for fd in (fo, fk):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self.fds = []
            final = wk.merged_snapshot(self.kern.mnt)
            self.exits.close()       # unmounts both; fails if our daemon did not exit 0
            # persistence: our upper, mounted again, shows what the kernel showed last
            import contextlib
            with contextlib.ExitStack() as ex:
                self.ours.mount_ours(ex)
                again = wk.merged_snapshot(self.ours.mnt)
            diff = wk.diff_snapshots(final, again, "kernel", "ours-remounted")
            assert not diff, "after remounting ours:\n  " + "\n  ".join(diff)
            diff, redundant = wk.compare_uppers(self.kern.upper, self.ours.upper,
                                                self.kern.lowers)
            if redundant and TRACE:
                print("redundant copy-ups (not failures):\n  " + "\n  ".join(redundant),
                      file=sys.stderr)
            assert not diff, "upper dirs differ:\n  " + "\n  ".join(diff)
        finally:
            wk._force_cleanup(self.tmp)
            self.tmp = None

    # -- helpers --------------------------------------------------------------------------

    def both(self, what, fn, *rels, **kw):
        """Apply fn(path_in_mount, ...) on both mounts; the outcomes must be equal."""
        with wk.hang_guard(self.conn, HANG_SECONDS, f"{what} {rels}"):
            ro = wk.attempt(fn, *[os.path.join(self.ours.mnt, r) if isinstance(r, str) else r
                                  for r in rels], **kw)
        rk = wk.attempt(fn, *[os.path.join(self.kern.mnt, r) if isinstance(r, str) else r
                              for r in rels], **kw)
        if TRACE:
            print(f"{what} {rels}: kernel={rk} ours={ro}", file=sys.stderr)
        assert ro == rk, f"{what} {rels}: kernel -> {rk}, ours -> {ro}"
        return rk

    def no_alias(self, *rels):
        """Skip the step if one of ``rels`` is a name of a lower hard link with other names
        (see _is_lower_alias): every rule that may change, copy up, rename or remove the
        object behind a name calls this for each name it touches."""
        for r in rels:
            assume(not _is_lower_alias(self.kern.mnt, self.kern.upper, r))

    # -- rules ----------------------------------------------------------------------------

    @rule(p=paths, data=payloads,
          how=st.sampled_from(["trunc", "append", "rdwr", "excl", "wronly"]),
          sync=st.booleans())
    def write(self, p, data, how, sync):
        flags = {"trunc": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                 "append": os.O_WRONLY | os.O_APPEND,
                 "rdwr": os.O_RDWR,
                 "excl": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                 "wronly": os.O_WRONLY | os.O_CREAT}[how]
        self.no_alias(p)

        def op(path):
            fd = os.open(path, flags | os.O_NONBLOCK, 0o640)     # (fifos: no blocking)
            try:
                n = os.write(fd, data)
                if sync:
                    os.fsync(fd)
                return n
            finally:
                os.close(fd)
        self.both(f"write[{how}]", op, p)

    @rule(p=paths)
    def read(self, p):
        def op(path):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                return os.read(fd, 1 << 16)
            finally:
                os.close(fd)
        self.both("read", op, p)

    @rule(p=paths, size=st.sampled_from([0, 3, 200]))
    def truncate(self, p, size):
        self.no_alias(p)
        self.both("truncate", os.truncate, p, size)

    @rule(p=paths, mode=st.sampled_from([0o755, 0o700]))
    def mkdir(self, p, mode):
        self.both("mkdir", os.mkdir, p, mode)

    @rule(p=paths)
    def rmdir(self, p):
        self.both("rmdir", os.rmdir, p)

    @rule(p=paths)
    def unlink(self, p):
        self.no_alias(p)
        self.both("unlink", os.unlink, p)

    @rule(p=paths, dest=st.sampled_from(["x", "../a", "nowhere", "a/x"]))
    def symlink(self, p, dest):
        self.both("symlink", lambda path: os.symlink(dest, path), p)

    @rule(src=paths, dst=paths)
    def link(self, src, dst):
        self.no_alias(src)
        self.both("link", lambda s, d: os.link(s, d, follow_symlinks=False), src, dst)

    @rule(src=paths, dst=paths,
          flags=st.sampled_from([0, 0, wk.RENAME_NOREPLACE, wk.RENAME_EXCHANGE]))
    def rename(self, src, dst, flags):
        # a no-op between two names of one lower hard link; the other names' link counts
        # otherwise (the target's too: it is removed)
        self.no_alias(src, dst)
        self.both(f"rename[{flags}]", lambda s, d: wk.renameat2(s, d, flags), src, dst)

    @rule(p=paths, mode=MODES)
    def chmod(self, p, mode):
        self.no_alias(p)
        self.both("chmod", os.chmod, p, mode)

    @rule(p=paths, owner=OWNERS)
    def chown(self, p, owner):
        self.no_alias(p)
        self.both("lchown", os.lchown, p, *owner)

    @rule(p=paths, t=st.sampled_from([(1_000_000_000, 2_000_000_000),
                                      (1_500_000_000_123_456_789, 1_600_000_000_987_654_321)]))
    def utime(self, p, t):
        self.no_alias(p)
        self.both("utime", lambda path: os.utime(path, ns=t, follow_symlinks=False), p)

        def times(path):
            s = os.lstat(path)
            return (s.st_atime_ns, s.st_mtime_ns)
        self.both("lstat-times", times, p)

    @rule(p=paths, name=st.sampled_from(["user.k1", "user.k2"]),
          value=st.sampled_from([b"v", b"", b"longer value"]),
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]))
    def setxattr(self, p, name, value, flags):
        self.no_alias(p)
        self.both("setxattr", lambda path: os.setxattr(path, name, value, flags,
                                                       follow_symlinks=False), p)

    @rule(p=paths, name=st.sampled_from(["user.k1", "user.k2"]))
    def removexattr(self, p, name):
        self.no_alias(p)
        self.both("removexattr", lambda path: os.removexattr(path, name,
                                                            follow_symlinks=False), p)

    @rule(p=paths, kind=st.sampled_from(["fifo", "sock", "chr", "blk", "whiteout"]))
    def mknod(self, p, kind):
        mode, dev = {"fifo": (stat.S_IFIFO | 0o644, 0),
                     "sock": (stat.S_IFSOCK | 0o644, 0),
                     "chr": (stat.S_IFCHR | 0o600, os.makedev(1, 3)),
                     "blk": (stat.S_IFBLK | 0o600, os.makedev(7, 0)),
                     "whiteout": (stat.S_IFCHR | 0o600, 0)}[kind]
        self.both(f"mknod[{kind}]", os.mknod, p, mode, dev)

    @rule(p=paths, data=payloads)
    def unlink_while_open(self, p, data):
        """Deleting an open file keeps the fd working."""
        self.no_alias(p)
        def op(path):
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            try:
                os.unlink(path)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
                st_ = os.fstat(fd)
                return (os.pread(fd, 1000, 0), st_.st_size, st_.st_nlink)
            finally:
                os.close(fd)
        self.both("open+unlink+write", op, p)

    @rule(p=paths)
    def fsyncdir(self, p):
        def op(path):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.both("fsyncdir", op, p)

    @rule(p=paths)
    def listdir(self, p):
        self.both("listdir", lambda path: sorted(os.listdir(path)), p)

    @rule(p=paths, what=st.sampled_from(["create", "append", "mkdir", "unlink", "rmdir",
                                         "read", "chmod"]))
    def as_user(self, p, what):
        """The same operation by an unprivileged user (uid/gid 1000): permission checks,
        and the owner of what it creates."""
        if what not in ("read", "mkdir", "rmdir"):
            self.no_alias(p)
        def op(path):
            return run_as(1000, 1000, what, path)
        self.both(f"as_user[{what}]", op, p)

    @precondition(lambda self: len(self.fds) < 3)
    @rule(p=paths, how=st.sampled_from(["r", "rw", "w-append"]))
    def open_keep(self, p, how):
        """Keep a file open across later operations (renames, unlinks, copy-ups)."""
        if how != "r":
            self.no_alias(p)
        flags = {"r": os.O_RDONLY, "rw": os.O_RDWR,
                 "w-append": os.O_WRONLY | os.O_APPEND}[how] | os.O_NONBLOCK
        fo = wk.attempt(os.open, os.path.join(self.ours.mnt, p), flags)
        fk = wk.attempt(os.open, os.path.join(self.kern.mnt, p), flags)
        if fo[0] == "ok" and fk[0] == "ok":
            self.fds.append((fo[1], fk[1]))
        else:
            for r in (fo, fk):
                if r[0] == "ok":
                    os.close(r[1])
        assert wk.outcome(fo) == wk.outcome(fk), f"open[{how}] {p}: kernel -> {fk}, ours -> {fo}"

    @precondition(lambda self: self.fds)
    @rule(i=st.integers(0, 2), what=st.sampled_from(["write", "read", "fstat", "ftruncate",
                                                      "fsync", "close"]),
          data=payloads)
    def fd_op(self, i, what, data):
        fo, fk = self.fds[i % len(self.fds)]

        def op(fd):
            if what == "write":
                return os.write(fd, data)
            if what == "read":
                return os.pread(fd, 1 << 16, 0)
            if what == "fstat":
                st_ = os.fstat(fd)
                return (oct(st_.st_mode), st_.st_size, st_.st_nlink, st_.st_uid, st_.st_gid)
            if what == "ftruncate":
                return os.ftruncate(fd, 5)
            if what == "fsync":
                return os.fsync(fd)
            if what == "close":
                return os.close(fd)
        with wk.hang_guard(self.conn, HANG_SECONDS, f"fd {what}"):
            ro = wk.attempt(op, fo)
        rk = wk.attempt(op, fk)
        if what == "close":
            self.fds.remove((fo, fk))
        if TRACE:
            print(f"fd[{i}] {what}: kernel={rk} ours={ro}", file=sys.stderr)
        assert ro == rk, f"fd {what}: kernel -> {rk}, ours -> {ro}"

    # -- invariant ------------------------------------------------------------------------

    @invariant()
    def same_merged_tree(self):
        if self.tmp is None:
            return
        with wk.hang_guard(self.conn, HANG_SECONDS, "snapshot of the merged tree"):
            so = wk.merged_snapshot(self.ours.mnt)
        sk = wk.merged_snapshot(self.kern.mnt)
        diff = wk.diff_snapshots(sk, so, "kernel", "ours")
        assert not diff, "merged trees differ:\n  " + "\n  ".join(diff)


OverlayWriteMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("OVL_DIFF_EXAMPLES", "25")),
    stateful_step_count=int(os.environ.get("OVL_DIFF_STEPS", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large],
    print_blob=True,
    report_multiple_bugs=bool(os.environ.get("OVL_DIFF_ALL_BUGS")),
)

TestDifferentialWrite = OverlayWriteMachine.TestCase
