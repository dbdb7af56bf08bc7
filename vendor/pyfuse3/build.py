#!/usr/bin/env python3
"""Build and install pyfuse3 3.5.0 with the small patch set overlayfs-py needs.

pyfuse3 3.5 hides two FUSE features that decide directory-listing speed and default-ACL
correctness, and it compiles from source anyway (there is no binary wheel for libfuse3), so
we fetch its pinned sdist from PyPI, apply exact text edits to its Cython source, and let
pip build it as usual. Each edit must match exactly once: a different sdist fails loudly
instead of building something half-patched.

The patch set (``pyfuse3.OVERLAYFS_PY_PATCH`` = its level):

1. ``readdir`` and ``fsyncdir`` receive the directory's inode number when the kernel sends no
   file handle (fh 0). The kernel does that once the daemon answers OPENDIR with ENOSYS
   (``no_opendir``, Linux >= 5.1), and it then caches each directory's listing in its page
   cache (``FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE`` by default): a warm ``find`` sends no
   request at all. Stock pyfuse3 passes only the (zero) file handle, so a daemon could not
   tell which directory is being read.
2. ``Operations.enable_dont_mask = True`` asks for ``FUSE_CAP_DONT_MASK``: the kernel stops
   applying the umask to create/mkdir/mknod and passes it in ``ctx.umask`` instead, so the
   daemon can let a parent's default ACL decide the mode as a local filesystem does.
3. A worker that has nothing else to wait for reads the next request directly: the FUSE fd is
   non-blocking, and when no other request is in flight and no trio task is runnable or has
   a deadline, the worker waits in ``poll(2)`` with the GIL released instead of going
   through ``trio.Lock`` + ``wait_readable`` (an epoll round trip and two scheduler passes
   per request). Measured: the first ``git status`` of a 10k-file repository went from
   622-661 ms to 381-466 ms (fuse-overlayfs: 330-383 ms). Anything else that could need
   trio (a handler awaiting a thread, a timer, a signal: poll returns EINTR) sends the
   worker back to the stock path. Spurious wakeups there are harmless: a read that finds
   nothing returns EAGAIN and the worker waits again.
4. Before it sleeps, that worker polls the fd without sleeping for ``set_poll_spin(ns)``
   (the daemon's ``spin_us`` option). On this VM most of a request's round trip is two
   wakeups of halted CPUs; a client that sends its next request within the spin saves one.
   Measured on tmpfs layers, 3 runs: 2000 creates 1060-1781 ms without, 635-864 ms with
   50 µs; tar of 5000 files, warm, 917-1469 → 381-546 ms. The sleep is bounded (1 s), so a
   signal that lands between the checks and the sleep is still handled within a second.
   With requests this cheap, trio's statistics (~2 µs) were a tenth of each one: while
   requests keep coming, ``_may_block`` trusts its last yes for a millisecond, and always
   checks again before the worker sleeps. First git status on tmpfs, 7 runs: 368-496 →
   309-408 ms; warm tar of 5000 files 403-469 → 319-355 ms.

Usage: build.py PYTHON   (installs into that interpreter's environment; no-op when the
installed pyfuse3 already carries this patch level).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.5.0"
SHA256 = "88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24"
PATCH_LEVEL = 4

EDITS = {
    "src/pyfuse3/handlers.pxi": [
        # 1. readdirplus: fh 0 means "no opendir": pass the inode instead
        ("""    c.size = size
    c.off = off
    c.fh = fi.fh
    save_retval(fuse_readdirplus_async(c))""",
         """    c.size = size
    c.off = off
    c.fh = fi.fh if fi.fh != 0 else ino    # overlayfs-py: no_opendir
    save_retval(fuse_readdirplus_async(c))"""),
        # 1. fsyncdir: same
        ("""    c.flags = datasync
    c.fh = fi.fh
    save_retval(fuse_fsyncdir_async(c))""",
         """    c.flags = datasync
    c.fh = fi.fh if fi.fh != 0 else ino    # overlayfs-py: no_opendir
    save_retval(fuse_fsyncdir_async(c))"""),
        # 2. DONT_MASK on request
        ("""    if (operations.enable_acl and
        conn.capable & FUSE_CAP_POSIX_ACL):
        conn.want |= FUSE_CAP_POSIX_ACL
""",
         """    if (operations.enable_acl and
        conn.capable & FUSE_CAP_POSIX_ACL):
        conn.want |= FUSE_CAP_POSIX_ACL
    if (getattr(operations, 'enable_dont_mask', False) and
        conn.capable & FUSE_CAP_DONT_MASK):
        conn.want |= FUSE_CAP_DONT_MASK
"""),
    ],
    "src/pyfuse3/internal.pxi": [
        # 4. after any request, spin before the next sleep (see _poll_in)
        ("""        save_retval(None)
        fuse_session_process_buf(session, &buf)
""",
         """        save_retval(None)
        _note_request()    # overlayfs-py: see _poll_in
        fuse_session_process_buf(session, &buf)
"""),
        # 3. read directly when nothing else can be pending
        ("""        if not await _wait_fuse_readable():
            break

        res = fuse_session_receive_buf(session, &buf)
""",
         """        if _may_block():    # overlayfs-py: see _may_block
            res = fuse_session_receive_buf(session, &buf)
            if res == -errno.EAGAIN:
                with nogil:
                    res = _poll_in(session_fd)
                if res < 0:      # EINTR: a signal; let trio's handler run first
                    await trio.lowlevel.checkpoint()
                continue
        else:
            if not await _wait_fuse_readable():
                break
            res = fuse_session_receive_buf(session, &buf)
            if res == -errno.EAGAIN:
                continue         # another worker took it
"""),
        ("""@async_wrapper
async def _session_loop(""",
         """cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum: CLOCK_MONOTONIC

cdef long _spin_ns = 0
cdef bint _spin_next = True      # a request came in since the last sleep: spin before the next
cdef long _checked_ns = 0        # when _may_block() last ran trio's statistics and said yes
cdef long _RECHECK_NS = 1000000  # ... which it then trusts for this long

cdef inline void _note_request() noexcept nogil:
    global _spin_next
    _spin_next = True

cdef long _now_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec * 1000000000 + t.tv_nsec

def set_poll_spin(long ns):
    \"\"\"overlayfs-py: how long an idle worker polls the FUSE fd without sleeping.\"\"\"
    global _spin_ns
    _spin_ns = max(ns, 0)

cdef int _poll_in(int fd) noexcept nogil:
    \"\"\"Wait until the FUSE fd is readable (> 0), or return 0 or -1 (EINTR) to have the
    caller check _may_block() again. After a request, first poll the fd without sleeping for
    up to _spin_ns (a client that answers within that needs no wakeup of this thread), then
    return 0 so that the full check runs before the sleep. The sleep lasts at most a second:
    a signal that arrives just before it interrupts nothing, and the check after it runs
    the signal's handler.\"\"\"
    global _spin_next, _checked_ns
    cdef pollfd p
    cdef long t0
    cdef int r
    p.fd = fd
    p.events = POLLIN
    p.revents = 0
    if _spin_next:
        _spin_next = False
        if _spin_ns > 0:
            t0 = _now_ns()
            while _now_ns() - t0 <= _spin_ns:
                r = poll(&p, 1, 0)
                if r != 0:
                    return r
        _checked_ns = 0
        return 0
    return poll(&p, 1, 1000)     # a request re-arms the spin (_note_request)

cdef double _INF = float('inf')

cdef bint _may_block():
    \"\"\"overlayfs-py: True if nothing but the next request can need this thread: no other
    worker is busy with a request, and no trio task is runnable, has a deadline, or has a
    thread result to collect. trio's statistics cost ~2 µs, a tenth of a request: while
    requests keep coming, a yes is trusted for a millisecond. Only a signal's handler can
    queue trio work meanwhile, and the check always runs before the worker sleeps.\"\"\"
    global _checked_ns
    if worker_data.task_count - worker_data.active_readers != 1:
        return False
    cdef long now = _now_ns()
    if now - _checked_ns < _RECHECK_NS:
        return True
    stats = trio.lowlevel.current_statistics()
    if (stats.tasks_runnable == 0 and stats.run_sync_soon_queue_size == 0
            and stats.seconds_to_next_deadline == _INF):
        _checked_ns = now
        return True
    return False

@async_wrapper
async def _session_loop("""),
    ],
    "src/pyfuse3/__init__.pyx": [
        # 3. the FUSE fd is non-blocking (see _session_loop)
        ("""    session_fd = fuse_session_fd(session)


@async_wrapper""",
         """    session_fd = fuse_session_fd(session)
    os.set_blocking(session_fd, False)    # overlayfs-py: see _may_block


@async_wrapper"""),
        ("""ROOT_INODE = FUSE_ROOT_ID
""",
         f"""ROOT_INODE = FUSE_ROOT_ID
OVERLAYFS_PY_PATCH = {PATCH_LEVEL}
"""),
    ],
    "PKG-INFO": [
        (f"\nVersion: {VERSION}\n", f"\nVersion: {VERSION}+overlayfspy{PATCH_LEVEL}\n"),
    ],
}


def installed_level(python: str) -> int:
    probe = "import pyfuse3; print(getattr(pyfuse3, 'OVERLAYFS_PY_PATCH', 0))"
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return int(r.stdout.strip() or 0) if r.returncode == 0 else -1


def apply_edits(src: Path) -> None:
    for rel, edits in EDITS.items():
        path = src / rel
        text = path.read_text()
        for old, new in edits:
            n = text.count(old)
            if n != 1:
                sys.exit(f"vendor/pyfuse3: edit for {rel} matches {n} times (expected 1); "
                         f"is this pyfuse3 {VERSION}?")
            text = text.replace(old, new)
        path.write_text(text)


def _safe_extract(tf: tarfile.TarFile, dest: Path) -> None:
    """extractall that refuses names leaving ``dest``. Python 3.12 and 3.11.4 have
    ``filter="data"`` for this; Debian 12's Python 3.11.2 does not, and its extractall()
    raises TypeError on the argument."""
    if hasattr(tarfile, "data_filter"):
        tf.extractall(dest, filter="data")
        return
    root = dest.resolve()
    for m in tf.getmembers():
        target = (root / m.name).resolve()
        if root not in target.parents and target != root or m.issym() or m.islnk() \
                or m.isdev():
            sys.exit(f"vendor/pyfuse3: unexpected member {m.name!r} in the sdist")
    tf.extractall(dest)


def _wheel_cache(python: str) -> Path:
    """Where a built wheel is kept, keyed by this script's contents and the interpreter:
    a second checkout (a fresh clone, a git worktree) installs it in seconds instead of
    compiling pyfuse3 again. Any change to the patch set changes the key."""
    tag = subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"],
                         capture_output=True, text=True, check=True).stdout.strip()
    key = hashlib.sha256(Path(__file__).read_bytes() + tag.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "overlayfs-py" / "pyfuse3" / key


def _build_wheel(python: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="pyfuse3-build-") as tmp:
        tmp = Path(tmp)
        subprocess.run([python, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"pyfuse3=={VERSION}", "-d", str(tmp)],
                       check=True)
        sdist = tmp / f"pyfuse3-{VERSION}.tar.gz"
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHA256:
            sys.exit(f"vendor/pyfuse3: {sdist.name} has sha256 {digest}, expected {SHA256}")
        with tarfile.open(sdist) as tf:
            _safe_extract(tf, tmp)
        src = tmp / f"pyfuse3-{VERSION}"
        apply_edits(src)
        print(f"vendor/pyfuse3: building pyfuse3 {VERSION} with overlayfs-py patch "
              f"level {PATCH_LEVEL} (about a minute)", flush=True)
        staging = tmp / "wheel"
        subprocess.run([python, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                        str(staging), str(src)], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, out)           # complete or absent, never half a cache entry
        except OSError:
            if not out.is_dir():              # another build won the race: keep its wheel
                raise


def main() -> None:
    python = sys.argv[1] if len(sys.argv) > 1 else sys.executable
    if installed_level(python) >= PATCH_LEVEL:
        return
    cache = _wheel_cache(python)
    wheels = sorted(cache.glob("pyfuse3-*.whl")) if cache.is_dir() else []
    if not wheels:
        _build_wheel(python, cache)
        wheels = sorted(cache.glob("pyfuse3-*.whl"))
    else:
        print(f"vendor/pyfuse3: installing the cached build {wheels[0]}", flush=True)
    # replace a stock pyfuse3 of the same version; pip resolves its dependency (trio)
    subprocess.run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "pyfuse3"],
                   check=False, capture_output=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheels[0])], check=True)
    level = installed_level(python)
    if level < PATCH_LEVEL:
        sys.exit(f"vendor/pyfuse3: installed pyfuse3 reports patch level {level}")


if __name__ == "__main__":
    main()
