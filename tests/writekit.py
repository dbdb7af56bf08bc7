"""Helpers for the write-path (upper layer) tests.

What lives here (and not in layerkit, which the infra helper owns):

- ``Stack``: a set of lower layers + an upper + a workdir, mountable either through the
  program under test (our daemon, or ``$OVL_TEST_PROG``) or through the kernel overlay
  driver, with a twin copy converted to the kernel's on-disk format.
- ``merged_snapshot`` / ``upper_snapshot``: comparable descriptions of a merged view and
  of an upper directory (kernel/FUSE private bookkeeping removed, everything that has a
  meaning kept: names, types, modes, owners, contents, whiteouts, opaque markers, xattrs).
- ``attempt``: run one syscall and return ``("ok", value)`` or ``("err", "ENOENT")``.
- ``renameat2`` via ctypes (RENAME_NOREPLACE / RENAME_EXCHANGE).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# syscalls
# ---------------------------------------------------------------------------------------------

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.renameat2.restype = ctypes.c_int


def renameat2(src, dst, flags=0):
    """rename(2) with flags; raises OSError like os.rename."""
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src), None, str(dst))


def attempt(fn, *args, **kwargs):
    """Run fn; return ("ok", result) or ("err", errno-name)."""
    try:
        return ("ok", fn(*args, **kwargs))
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, str(e.errno)))


def outcome(res):
    """Only the success/errno part of an attempt() result."""
    return res[0] if res[0] == "ok" else res[1]


# ---------------------------------------------------------------------------------------------
# layer trees
# ---------------------------------------------------------------------------------------------

WHITEOUT_ATTR_PRIVATE = (
    # bookkeeping the kernel or fuse-overlayfs (or we) may write; they do not change what the
    # merged view shows, so upper comparisons ignore them
    "trusted.overlay.origin", "trusted.overlay.impure", "trusted.overlay.uuid",
    "trusted.overlay.nlink", "trusted.overlay.upper", "trusted.overlay.metacopy",
    "user.overlay.origin", "user.overlay.impure", "user.overlay.uuid", "user.overlay.nlink",
    "user.fuseoverlayfs.origin",
)
OPAQUE_ATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")


class Marker:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


WHITEOUT = Marker("WHITEOUT")          # char device 0/0
WH_FILE = Marker("WH_FILE")            # .wh.NAME empty file (OCI / AUFS)
OPAQUE = Marker("OPAQUE")              # dir with trusted.overlay.opaque=y
OPQ_FILE = Marker("OPQ_FILE")          # dir containing .wh..wh..opq
DIR = Marker("DIR")
FIFO = Marker("FIFO")


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Hardlink:
    to: str  # path inside the same layer


def build_layer(root, spec, mode=None):
    """Create a layer tree from {relpath: content}. Content: str/bytes = regular file,
    DIR, OPAQUE (xattr), OPQ_FILE (.wh..wh..opq), WHITEOUT (char 0/0), WH_FILE (.wh.NAME),
    FIFO, Symlink(target), Hardlink(other relpath). Parents are created as plain dirs."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for rel in sorted(spec, key=lambda p: (p.count("/"), p)):
        val = spec[rel]
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(val, (str, bytes)):
            p.write_bytes(val.encode() if isinstance(val, str) else val)
            if mode is not None:
                os.chmod(p, mode)
        elif val is DIR:
            p.mkdir(exist_ok=True)
        elif val is OPAQUE:
            p.mkdir(exist_ok=True)
            os.setxattr(p, "trusted.overlay.opaque", b"y")
        elif val is OPQ_FILE:
            p.mkdir(exist_ok=True)
            (p / ".wh..wh..opq").write_bytes(b"")
        elif val is WHITEOUT:
            os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        elif val is WH_FILE:
            (p.parent / (".wh." + p.name)).write_bytes(b"")
        elif val is FIFO:
            os.mkfifo(p)
        elif isinstance(val, Symlink):
            os.symlink(val.target, p)
        elif isinstance(val, Hardlink):
            os.link(root / val.to, p)
        else:
            raise ValueError(f"bad spec value {val!r} for {rel}")
    return root


def convert_to_kernel(root):
    """In place: .wh.NAME -> char 0/0 NAME, .wh..wh..opq -> trusted.overlay.opaque=y."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(filenames) + list(dirnames):
            full = os.path.join(dirpath, name)
            if name == ".wh..wh..opq":
                os.unlink(full)
                os.setxattr(dirpath, "trusted.overlay.opaque", b"y")
            elif name.startswith(".wh."):
                target = os.path.join(dirpath, name[4:])
                os.unlink(full)
                if os.path.lexists(target):
                    if os.path.isdir(target) and not os.path.islink(target):
                        shutil.rmtree(target)
                    else:
                        os.unlink(target)
                os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def copy_tree(src, dst):
    """cp -a, keeping xattrs, devices and hard links."""
    subprocess.run(["cp", "-a", "--preserve=all", str(src), str(dst)], check=True)


# ---------------------------------------------------------------------------------------------
# mounting
# ---------------------------------------------------------------------------------------------

def prog_argv(opts, mnt, extra=()):
    """Command line of the FUSE daemon under test, in the foreground."""
    prog = os.environ.get("OVL_TEST_PROG")
    if prog:
        return [*shlex.split(prog), *extra, "-f", "-o", opts, str(mnt)]
    return [ours_python(), "-m", "overlayfs_py", *extra, "-f", "-o", opts, str(mnt)]


def ours_python():
    """A python that can import pyfuse3 (the project venv, else the probe venv)."""
    for cand in (sys.executable, str(REPO / ".venv/bin/python"), "/tmp/probe/bin/python"):
        if not os.path.exists(cand):
            continue
        r = subprocess.run([cand, "-c", "import pyfuse3, trio"], capture_output=True)
        if r.returncode == 0:
            return cand
    return sys.executable


def prog_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def prog_name():
    return os.environ.get("OVL_TEST_PROG") or "overlayfs_py"


def is_fuse_overlayfs():
    return "fuse-overlayfs" in (os.environ.get("OVL_TEST_PROG") or "")


def wait_mounted(mnt, proc=None, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(mnt):
            return
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"daemon exited with {proc.returncode} before mounting: {err}")
        time.sleep(0.02)
    raise RuntimeError(f"{mnt} not mounted after {timeout}s")


def fuse_unmount(mnt, lazy=False):
    args = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [str(mnt)]
    return subprocess.run(args, capture_output=True).returncode


class FuseDaemon:
    """The program under test mounted in the foreground as a child process."""

    def __init__(self, lowers, upper, work, mnt, options=(), debug=False):
        self.mnt = str(mnt)
        opts = "lowerdir=" + ":".join(map(str, lowers))
        if upper is not None:
            opts += f",upperdir={upper},workdir={work}"
        for o in options:
            opts += "," + o
        self.argv = prog_argv(opts, mnt, extra=("-d",) if debug else ())
        self.errfile = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self.errfile,
                                     env=prog_env(), start_new_session=True)
        try:
            self._wait()
        except BaseException:
            self.kill()
            raise

    @property
    def pid(self):
        return self.proc.pid

    def stderr(self):
        self.errfile.seek(0)
        return self.errfile.read().decode(errors="replace")

    def _wait(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.ismount(self.mnt):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited {self.proc.returncode} before mounting:"
                                   f"\n{self.stderr()}")
            time.sleep(0.02)
        raise RuntimeError(f"{self.mnt} not mounted after {timeout}s:\n{self.stderr()}")

    def kill(self):
        """kill -9, then lazy unmount; for crash tests and failure cleanup."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        if os.path.ismount(self.mnt):
            fuse_unmount(self.mnt, lazy=True)

    def unmount(self, check=True):
        """Clean unmount; returns the daemon's exit code (raises if check and it is not 0)."""
        if self.proc.poll() is None and os.path.ismount(self.mnt):
            if fuse_unmount(self.mnt) != 0:
                time.sleep(0.3)
                if fuse_unmount(self.mnt) != 0:
                    fuse_unmount(self.mnt, lazy=True)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"daemon did not exit after unmount:\n{self.stderr()}")
        if os.path.ismount(self.mnt):
            fuse_unmount(self.mnt, lazy=True)
        if check and rc != 0:
            raise RuntimeError(f"daemon exited {rc}:\n{self.stderr()}")
        return rc


class KernelMount:
    KOPTS = "redirect_dir=off,index=off,metacopy=off,xino=off"

    def __init__(self, lowers, upper, work, mnt, options=()):
        self.mnt = str(mnt)
        opts = "lowerdir=" + ":".join(map(str, lowers))
        if upper is not None:
            opts += f",upperdir={upper},workdir={work}"
        opts += "," + self.KOPTS
        for o in options:
            opts += "," + o
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, self.mnt], check=True,
                       capture_output=True)

    def unmount(self, check=True):
        r = subprocess.run(["umount", self.mnt], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", self.mnt], capture_output=True)
        return 0


def kernel_overlay_available():
    if os.geteuid() != 0:
        return False
    with open("/proc/filesystems") as f:
        return any(line.split()[-1] == "overlay" for line in f if line.strip())


def fuse_available():
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


class Stack:
    """lowers (top first) + upper + work under one temp dir; mounts on demand."""

    def __init__(self, base, layer_specs, name="s", kernel_format=False):
        self.base = Path(base) / name
        self.base.mkdir(parents=True)
        self.lowers = []
        for i, spec in enumerate(layer_specs):
            d = self.base / f"l{i}"
            build_layer(d, spec)
            if kernel_format:
                convert_to_kernel(d)
            self.lowers.append(d)
        if not layer_specs:
            d = self.base / "l0"
            d.mkdir()
            self.lowers.append(d)
        self.upper = self.base / "upper"
        self.work = self.base / "work"
        self.mnt = self.base / "mnt"
        for d in (self.upper, self.work, self.mnt):
            d.mkdir()
        self.mount = None

    def clone(self, name, kernel_format=False):
        """A copy of the (unmounted) layers, upper and work included."""
        other = Stack.__new__(Stack)
        other.base = self.base.parent / name
        other.base.mkdir()
        other.lowers = []
        for d in self.lowers:
            copy_tree(d, other.base / d.name)
            if kernel_format:
                convert_to_kernel(other.base / d.name)
            other.lowers.append(other.base / d.name)
        for attr in ("upper", "work"):
            copy_tree(getattr(self, attr), other.base / attr)
            setattr(other, attr, other.base / attr)
        other.mnt = other.base / "mnt"
        other.mnt.mkdir()
        other.mount = None
        return other

    def mount_ours(self, options=(), debug=False):
        self.mount = FuseDaemon(self.lowers, self.upper, self.work, self.mnt, options, debug)
        return self.mount

    def mount_kernel(self, options=()):
        self.mount = KernelMount(self.lowers, self.upper, self.work, self.mnt, options)
        return self.mount

    def unmount(self, check=True):
        m, self.mount = self.mount, None
        if m is not None:
            return m.unmount(check=check)

    def reset_work(self):
        """Empty the workdir (the kernel refuses a workdir another overlay used: its
        work/ subdir and whiteout are private)."""
        shutil.rmtree(self.work)
        self.work.mkdir()


# ---------------------------------------------------------------------------------------------
# snapshots
# ---------------------------------------------------------------------------------------------

def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()[:16]


def _xattrs(path, keep):
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for n in sorted(names):
        if not keep(n):
            continue
        try:
            v = os.getxattr(path, n, follow_symlinks=False)
        except OSError as e:
            v = f"<{errno.errorcode.get(e.errno)}>".encode()
        out.append((n, v))
    return tuple(out)


def _user_xattr(n):
    return n.startswith("user.")


def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def describe(path, st, xattr_keep=_user_xattr, with_content=True):
    """One entry of a snapshot: a tuple of what the overlay must reproduce."""
    m = st.st_mode
    perm = stat.S_IMODE(m)
    owner = (st.st_uid, st.st_gid)
    if stat.S_ISDIR(m):
        return ("dir", oct(perm), owner, _xattrs(path, xattr_keep))
    if stat.S_ISREG(m):
        c = _digest(path) if with_content else None
        return ("file", oct(perm), owner, st.st_size, c, st.st_nlink, _xattrs(path, xattr_keep))
    if stat.S_ISLNK(m):
        return ("symlink", owner, os.readlink(path), _xattrs(path, xattr_keep))
    if stat.S_ISCHR(m) or stat.S_ISBLK(m):
        kind = "chr" if stat.S_ISCHR(m) else "blk"
        return (kind, oct(perm), owner, os.major(st.st_rdev), os.minor(st.st_rdev),
                st.st_nlink, _xattrs(path, xattr_keep))
    if stat.S_ISFIFO(m):
        return ("fifo", oct(perm), owner, st.st_nlink, _xattrs(path, xattr_keep))
    if stat.S_ISSOCK(m):
        return ("sock", oct(perm), owner, st.st_nlink, _xattrs(path, xattr_keep))
    return ("?", oct(m))


def merged_snapshot(root, with_inodes=True):
    """{relpath: description} of a merged view, plus hard-link groups (paths sharing st_ino)
    under the key '#links'. Directory sizes, link counts and times are left out."""
    root = str(root)
    out = {}
    inos = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                out[rel] = ("listed-but-ENOENT",)
                continue
            out[rel] = describe(full, st)
            if not stat.S_ISDIR(st.st_mode):
                inos.setdefault(st.st_ino, []).append(rel)
    if with_inodes:
        out["#links"] = tuple(sorted(tuple(sorted(v)) for v in inos.values() if len(v) > 1))
    return out


def _upper_keep(n):
    return n not in WHITEOUT_ATTR_PRIVATE and n not in OPAQUE_ATTRS


def upper_snapshot(upper):
    """{relpath: description} of an upper dir, normalized: whiteouts (any mode, any link count)
    -> ('whiteout',), dirs carry an 'opaque' flag (any of the opaque xattrs = 'y'), private
    bookkeeping xattrs dropped. Marker files (.wh.*) are kept as they are: they are part of
    the format and show up as differences on purpose."""
    upper = str(upper)
    out = {}
    for dirpath, dirnames, filenames in os.walk(upper):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, upper)
            st = os.lstat(full)
            if _is_whiteout(st):
                out[rel] = ("whiteout",)
                continue
            d = describe(full, st, xattr_keep=_upper_keep)
            if stat.S_ISDIR(st.st_mode):
                d = d + (("opaque",) if is_opaque_dir(full) else ())
            elif stat.S_ISREG(st.st_mode):
                # nlink of upper files depends on the overlay's private hard links
                d = d[:5] + d[6:]
            out[rel] = d
    return out


def is_opaque_dir(path):
    for a in OPAQUE_ATTRS:
        try:
            if os.getxattr(path, a, follow_symlinks=False)[:1] == b"y":
                return True
        except OSError:
            pass
    return False


def diff_snapshots(a, b, label_a="a", label_b="b"):
    """Readable list of differences between two snapshots (empty if equal)."""
    lines = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            lines.append(f"{k}: {label_a}={va!r} {label_b}={vb!r}")
    return lines


# ---------------------------------------------------------------------------------------------
# misc
# ---------------------------------------------------------------------------------------------

def write_file(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o644, fsync=False):
    fd = os.open(path, flags, mode)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def tempbase(prefix="ovlw-"):
    d = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(d)
    finally:
        _force_cleanup(d)


def _force_cleanup(d):
    # unmount anything still mounted under d, then remove it
    with open("/proc/self/mountinfo") as f:
        mps = [line.split()[4] for line in f]
    for mp in sorted((m for m in mps if m.startswith(str(d) + "/")), key=len, reverse=True):
        if subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True).returncode:
            subprocess.run(["umount", "-l", mp], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def tree_paths(root):
    """Sorted relative paths of everything under root (no metadata)."""
    root = str(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)
